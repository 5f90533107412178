"""Per-iteration replication of hot experts, maxvio and the relayout rule, against hand
computation (analysis/replication.py), and `recommend --run` on a recorded run."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from megatron_moe_probe.analysis.replication import (maxvio, relayout_decision, replicate_hot_experts,
                                                     replication_section)
from megatron_moe_probe.cli import main as cli_main
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.from_run import flex_dedup_factor

RUN = str(Path(__file__).parent / "data" / "h200_run_mock")


def test_maxvio_by_hand():
    assert maxvio([4, 4, 4, 4]) == 0.0
    assert maxvio([12, 4]) == pytest.approx(0.5)      # mean 8, max 12
    assert maxvio([0, 0]) == 0.0
    with pytest.raises(UsageError):
        maxvio([])


def test_one_hot_expert_split_between_two_ranks():
    # Experts 0,1 on rank 0 and 2,3 on rank 1: ranks compute 12 and 4 tokens. One replica slot:
    # rank 1 takes half the gap, 4 of expert 0's 10 tokens -> 8 and 8.
    r = replicate_hot_experts([10, 2, 2, 2], ep=2, slots_per_rank=1)
    assert r["rank_loads_static"] == [12, 4] and r["rank_loads_replicated"] == [8, 8]
    assert r["replicas"] == [{"expert": 0, "home": 0, "from": 0, "to": 1, "tokens": 4}]
    assert r["maxvio_static"] == pytest.approx(0.5) and r["maxvio_replicated"] == 0.0 and r["weights_moved"] == 1


def test_replication_chain_by_hand():
    # EP 4, two experts per rank: static loads 10, 2, 2, 2 (mean 4, maxvio 1.5).
    # 1) rank 0 -> rank 1: min(9, (10-2)//2) = 4 of expert 0        -> 6, 6, 2, 2
    # 2) rank 0 (tie, lower rank) -> rank 2: min(5, (6-2)//2) = 2    -> 4, 6, 4, 2
    # 3) rank 1 -> rank 3: its hottest is its copy of expert 0 (4): 2 -> 4, 4, 4, 4
    r = replicate_hot_experts([9, 1, 1, 1, 1, 1, 1, 1], ep=4, slots_per_rank=1)
    assert r["rank_loads_replicated"] == [4, 4, 4, 4]
    assert [(x["from"], x["to"], x["tokens"]) for x in r["replicas"]] == [(0, 1, 4), (0, 2, 2), (1, 3, 2)]
    assert r["maxvio_static"] == pytest.approx(1.5) and r["weights_moved"] == 3
    # no slots: nothing moves
    r0 = replicate_hot_experts([9, 1, 1, 1, 1, 1, 1, 1], ep=4, slots_per_rank=0)
    assert r0["rank_loads_replicated"] == r0["rank_loads_static"] and r0["weights_moved"] == 0


def test_replication_section_means_over_iterations():
    counts = torch.tensor([[[10, 2, 2, 2]], [[4, 4, 4, 4]]])  # [iteration, layer, expert]
    s = replication_section(counts, ep=2, slots_per_rank=1)
    (layer,) = s["layers"]
    assert layer["maxvio_static"] == pytest.approx((0.5 + 0.0) / 2)
    assert layer["maxvio_replicated"] == 0.0 and layer["weights_moved_per_iteration"] == pytest.approx(0.5)


def test_relayout_weighs_saving_against_moving_cost():
    # Loads 8, 6, 1, 1 at EP 2: contiguous {0,1},{2,3} -> 14 and 2; the balanced layout
    # {0,3},{1,2} -> 9 and 7. Saving 5 tokens/iteration x 1 ms = 5 ms; two experts moved,
    # 2 x 1 GB / 100 GB/s = 20 ms: it pays after 4 iterations, not within 3.
    kw = dict(seconds_per_token=1e-3, expert_bytes=1e9, link_gb_s=100)
    d = relayout_decision([8, 6, 1, 1], 2, iterations=10, **kw)
    assert d["busiest_tokens_before"] == 14 and d["busiest_tokens_after"] == 9 and d["experts_moved"] == 2
    assert d["saving_s_per_iteration"] == pytest.approx(5e-3) and d["move_cost_s"] == pytest.approx(0.02)
    assert d["break_even_iterations"] == pytest.approx(4.0) and d["pays_off"]
    assert not relayout_decision([8, 6, 1, 1], 2, iterations=3, **kw)["pays_off"]
    # nothing better than contiguous: nothing moves, nothing pays
    same = relayout_decision([8, 1, 1, 6], 2, iterations=100, **kw)
    assert same["experts_moved"] == 0 and not same["pays_off"] and same["break_even_iterations"] is None
    with pytest.raises(UsageError):
        relayout_decision([8, 6, 1, 1], 2, iterations=0, **kw)


def test_flex_dedup_factor_by_hand():
    # EP 2, top-4: a token reaches 2 * (1 - (1/2)^4) = 1.875 ranks on average, 1.875 / 4 of the copies.
    assert flex_dedup_factor(2, 4) == pytest.approx(1.875 / 4)
    assert flex_dedup_factor(1, 8) == 1.0 and flex_dedup_factor(8, 1) == 1.0


def test_analyze_prints_replication_beside_placement(capsys):
    assert cli_main(["analyze", RUN, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    rep = d["replication"]
    assert rep["ep"] == d["placement"]["ep"] and len(rep["layers"]) == len(d["run"]["layers"])
    for layer in rep["layers"]:
        assert 0.0 <= layer["maxvio_replicated"] <= layer["maxvio_static"]


def _independent_run_numbers() -> dict:
    """Receiver skew and inter-node fraction straight from intervals.jsonl (not through the code)."""
    reports = [json.loads(line) for line in open(f"{RUN}/intervals.jsonl") if line.strip()]
    layers = len(reports[0]["per_layer"])
    def med(stat):
        return statistics.median(statistics.median(r["per_layer"][i][stat] for r in reports) for i in range(layers))
    return {"receiver_skew": med("receiver_skew"), "inter_node_fraction": med("inter_node_fraction")}


def test_recommend_from_run_reasons_with_the_measured_routing(capsys):
    assert cli_main(["recommend", "--run", RUN, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["query"]["hardware"] == "H200" and d["query"]["ep"] == 2  # the question came from the run
    run = d["run"]
    expected = _independent_run_numbers()
    assert run["routing"]["receiver_skew"] == pytest.approx(expected["receiver_skew"])
    assert run["routing"]["inter_node_fraction"] == pytest.approx(expected["inter_node_fraction"])
    assert run["verdicts"]["imbalance"] == "second-order"  # a few percent over the mean
    assert f"{expected['receiver_skew']:.3g}" in run["reasoning"][0]
    pred = {p["backend"]: p for p in run["predictions"]}
    assert pred["alltoall"]["bytes_share"] == 1.0
    for b in ("deepep", "hybridep"):
        if b in pred:
            assert pred[b]["dispatch_us"] == pytest.approx(pred["alltoall"]["dispatch_us"] * flex_dedup_factor(2, 4))
    # flags given on the command line win over the run's
    assert cli_main(["recommend", "--run", RUN, "--hardware", "H100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["query"]["hardware"] == "H100"


def test_recommend_needs_ep_or_run(capsys):
    assert cli_main(["recommend", "--hardware", "H100"]) == 2
    assert "--ep is required" in capsys.readouterr().err
