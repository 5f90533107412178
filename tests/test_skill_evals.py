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
    return [*check["argv"], "--assume-installed", check["installed"], "--json"]


def test_evals_file_shape():
    assert EVALS["skill_name"] == CARD.name
    ids = [e["id"] for e in EVALS["evals"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 8
    for e in EVALS["evals"]:
        assert e["prompt"].strip() and e["ground_truth"].strip() and e["checks"] and e["source"] in ("bridge", "project")
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
