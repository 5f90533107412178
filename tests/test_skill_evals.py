"""Every question in skills/perf-moe-dispatcher-selection/evals/evals.json, through `moe-probe recommend --json`.

The checks are facts of the JSON answer (backend ids, numbers, dates), not wording. The
ground truths were written from the sources (the current Bridge skill, seed 002), not
read back from the card; test_evals_can_fail shows that a card without the evidence
fails them.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import yaml

from megatron_moe_probe.cli import main as cli_main
from megatron_moe_probe.commands import recommend as command
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.card import CARD_PATH, SKILL_DIR, Card, default_card

CARD = default_card()
EVALS = json.loads((SKILL_DIR / "evals" / "evals.json").read_text())
CHECKS = [pytest.param(e, i, c, id=f"{e['id']}-{i}") for e in EVALS["evals"] for i, c in enumerate(e["checks"])]


def values(doc, path: str) -> list:
    """The values at a dotted path; `name[]` maps over a list."""
    current = [doc]
    for part in path.split("."):
        nxt = []
        for v in current:
            if part.endswith("[]"):
                nxt.extend((v or {}).get(part[:-2]) or [])
            else:
                nxt.append(v.get(part) if isinstance(v, dict) else None)
        current = nxt
    return current


def failures(doc: dict, expect: list[dict]) -> list[str]:
    bad = []
    for e in expect:
        path = e["path"]
        vals = values(doc, path)
        mapped = "[]" in path
        got = vals if mapped else vals[0]
        if "equals" in e and got != e["equals"]:
            bad.append(f"{path} = {got!r}, expected {e['equals']!r}")
        if "contains" in e:
            hay = got if isinstance(got, list) else [got]
            if not any(e["contains"] == h or (isinstance(h, str) and isinstance(e["contains"], str) and e["contains"] in h)
                       for h in hay):
                bad.append(f"{path} = {got!r} does not contain {e['contains']!r}")
        if "not_contains" in e and e["not_contains"] in (got if isinstance(got, list) else [got]):
            bad.append(f"{path} = {got!r} contains {e['not_contains']!r}")
        if e.get("is_null") and got is not None:
            bad.append(f"{path} = {got!r}, expected null")
        if "approx" in e and not (isinstance(got, (int, float)) and math.isclose(got, e["approx"], rel_tol=1e-3)):
            bad.append(f"{path} = {got!r}, expected about {e['approx']}")
    return bad


def argv_of(check: dict) -> list[str]:
    # Run folders in the evals are relative to the repository root, wherever pytest runs from.
    root = SKILL_DIR.parents[1]
    argv = [str(root / a) if a.startswith("tests/data/") else a for a in check["argv"]]
    return [*argv, "--assume-installed", check["installed"], "--json"]


def test_evals_file_shape():
    assert EVALS["skill_name"] == CARD.name
    ids = [e["id"] for e in EVALS["evals"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 8
    for e in EVALS["evals"]:
        assert e["prompt"].strip() and e["ground_truth"].strip() and e["checks"] and e["source"] in ("bridge", "project", "public")
        for c in e["checks"]:
            assert c.get("expect") or c.get("error_contains")
    # Bridge's own question is here, word for word in its first sentence.
    assert any(e["prompt"].startswith("Use the nemo-mbridge-perf-moe-dispatcher-selection skill.") for e in EVALS["evals"])


@pytest.mark.parametrize("case,i,check", CHECKS)
def test_eval_through_recommend_json(case, i, check, capsys):
    rc = cli_main(["recommend", *argv_of(check)])
    out = capsys.readouterr()
    if "error_contains" in check:
        assert rc == 2 and out.out == ""
        for text in check["error_contains"]:
            assert text in out.err
        return
    assert rc == 0, out.err
    doc = json.loads(out.out)
    assert not failures(doc, check["expect"]), failures(doc, check["expect"])


def _answer(card: Card, check: dict) -> dict:
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    args = p.parse_args(argv_of(check))
    return command.answer(args, card, detector=lambda: pytest.fail("hardware given, must not detect")).to_dict()


def test_evals_can_fail():
    """The same checks against the card without Bridge's evidence (its measured rows and the rules
    that superseded the seed) fail: the evals test the evidence, not the code's wording."""
    data = yaml.safe_load(CARD_PATH.read_text())
    data["measured"] = [m for m in data["measured"] if m["source"] != "bridge"]
    superseders = {r["superseded_by"] for r in data["rules"] if r.get("superseded_by")}
    data["rules"] = [{k: v for k, v in r.items() if k != "superseded_by"} for r in data["rules"] if r["id"] not in superseders]
    seed_card = Card.model_validate(data)
    case = next(e for e in EVALS["evals"] if e["id"] == "bridge-qwen3-counterexamples")
    bad = failures(_answer(seed_card, case["checks"][0]), case["checks"][0]["expect"])
    assert any(b.startswith("winner.backend") for b in bad) and any(b.startswith("decision") for b in bad)
    # and with the real card the same call passes
    assert not failures(_answer(CARD, case["checks"][0]), case["checks"][0]["expect"])


# -- card v3: the public evidence of 2026-08/09 ------------------------------------------------

def public_items(card_data: dict) -> set[str]:
    """Every card item that public evidence added: rule, measured, pitfall, new-dispatcher and
    correctness-check ids, table rows as `table:row`, and `backend:ID` for backends it changed."""
    items = {x["id"] for key in ("rules", "measured", "pitfalls", "new_dispatchers", "correctness_checks")
             for x in card_data.get(key) or [] if x["source"] == "public"}
    items |= {f"{t}:{r['row']}" for t, rows in card_data["tables"].items() for r in rows if r["source"] == "public"}
    items |= {f"backend:{b['id']}" for b in card_data["backends"] if b["source"] == "public"}
    items.add("backend:alltoall")  # its perf-harness line changed (no `--moe_flex_dispatcher_backend None`)
    return items


def without_public(card_data: dict) -> dict:
    """The card as it was before the public evidence (v2's answers): public rows, rules and
    checks dropped, the rules they superseded current again, the NVL72 row back to its bridge
    text and candidates, B300 and the two new model families gone, the backends as they were."""
    data = json.loads(json.dumps(card_data))
    public_rules = {r["id"] for r in data["rules"] if r["source"] == "public"}
    data["rules"] = [{k: v for k, v in r.items() if not (k == "superseded_by" and v in public_rules)}
                     for r in data["rules"] if r["id"] not in public_rules]
    for key in ("measured", "pitfalls", "new_dispatchers", "correctness_checks", "evidence"):
        data[key] = [x for x in data.get(key) or [] if x["source"] != "public"]
    for table in ("by_model", "by_interconnect"):
        data["tables"][table] = [r for r in data["tables"][table] if r["source"] != "public"]
    rows = []
    for r in data["tables"]["by_hardware"]:
        if r["source"] == "public" and r.get("history"):
            older = r["history"][0]
            r = {**r, "text": older["text"], "why": older["why"], "source": older["source"], "date": older["date"],
                 "history": r["history"][1:], "tuned": [c for c in r["tuned"] if c["backend"] != "ncclep"]}
            r.pop("ref", None)
        if r["source"] != "public":
            rows.append(r)
    data["tables"]["by_hardware"] = rows
    data["hardware"] = [h for h in data["hardware"] if h["source"] != "public"]
    data["model_families"] = [m for m in data["model_families"] if m["id"] not in ("qwen3.5-35b", "gpt-oss")]
    for b in data["backends"]:
        if b["id"] == "alltoall":
            b["bridge_perf_harness"] = "--moe_flex_dispatcher_backend None"
        if b["id"] == "ncclep":
            b.update(bridge_perf_harness=None, source="megatron", date="2026-11-29")
    return data


PUBLIC = [e for e in EVALS["evals"] if e["source"] == "public"]


def test_a_question_per_new_row():
    """Every card item the public evidence added is named by an eval's `covers`."""
    data = yaml.safe_load(CARD_PATH.read_text())
    covered = {c for e in EVALS["evals"] for c in e.get("covers", [])}
    missing = public_items(data) - covered
    assert not missing, f"public card rows without an eval question: {sorted(missing)}"
    assert covered >= public_items(data)


def _check_fails(card: Card, check: dict) -> bool:
    try:
        return bool(failures(_answer(card, check), check["expect"]))
    except UsageError:  # e.g. the hardware or model family the evidence added is unknown
        return True


@pytest.mark.parametrize("case", PUBLIC, ids=[e["id"] for e in PUBLIC])
def test_public_evals_fail_without_the_new_rows(case):
    """Each public eval passes on card v3 and fails on the card without its public rows."""
    old = Card.model_validate(without_public(yaml.safe_load(CARD_PATH.read_text())))
    assert not any(c.startswith("card:") for c in case["covers"])
    assert any(_check_fails(old, check) for check in case["checks"]), f"{case['id']} passes without the new rows"
    for check in case["checks"]:
        assert not failures(_answer(CARD, check), check["expect"])
