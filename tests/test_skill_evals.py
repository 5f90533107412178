"""Run every prompt in skills/perf-moe-dispatcher-selection/evals/evals.json through `recommend`."""

from __future__ import annotations

import argparse
import json

import pytest

from megatron_moe_probe.selection.availability import assumed
from megatron_moe_probe.selection.card import SKILL_DIR, default_card
from megatron_moe_probe.commands.recommend import add_arguments, build_query
from megatron_moe_probe.selection.recommend import recommend

CARD = default_card()
EVALS = json.loads((SKILL_DIR / "evals" / "evals.json").read_text())


def test_evals_file_shape():
    assert EVALS["skill_name"] == CARD.name
    assert len(EVALS["evals"]) >= 8
    ids = [e["id"] for e in EVALS["evals"]]
    assert len(ids) == len(set(ids))
    for e in EVALS["evals"]:
        assert e["prompt"].strip() and e["expected_output"].strip() and e["expect"]


@pytest.mark.parametrize("case", EVALS["evals"], ids=lambda e: e["id"])
def test_eval_through_recommend(case):
    # Build the query through the CLI's own argument parsing, as an agent would call it.
    p = argparse.ArgumentParser()
    add_arguments(p)
    inp = case["inputs"]
    argv = ["--hardware", inp["hardware"], "--ep", str(inp["ep"]), "--model", inp["model"], "--stage", inp["stage"]]
    for key in ("nodes", "gpus_per_node", "precision"):
        if key in inp:
            argv += [f"--{key.replace('_', '-')}", str(inp[key])]
    args = p.parse_args(argv)
    q = build_query(args, CARD, detector=lambda: pytest.fail("hardware given, must not detect"))
    rec = recommend(q, CARD, assumed(CARD, set(case["installed"])))
    exp = case["expect"]
    if "use" in exp:
        assert rec.use == exp["use"]
    if "first_choice" in exp:
        assert rec.first_choice == exp["first_choice"]
    if "fallback" in exp:
        assert rec.fallback == exp["fallback"]
    if "first_choice_available" in exp:
        assert rec.first_choice_available is exp["first_choice_available"]
    if "also_measure" in exp:
        assert rec.also_measure == exp["also_measure"]
    if "warning_contains" in exp:
        assert any(exp["warning_contains"] in w for w in rec.warnings)
    fs = rec.flags[rec.use]
    for tok in exp.get("megatron_lm_contains", []):
        assert tok in fs.megatron_lm
    for tok in exp.get("bridge_contains", []):
        assert tok in fs.to_dict()["bridge_overrides"]
    for tok in exp.get("env_contains", []):
        assert tok in fs.env
    # The expected answer text names the backend used.
    assert CARD.backend(rec.use).label.lower() in case["expected_output"].lower() or rec.use in case["expected_output"]
