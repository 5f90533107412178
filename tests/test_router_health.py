"""Router health: every statistic recomputed with numpy from the router's own outputs (its
logits and final routing map, recorded per counted call on every rank) and Megatron's expert
bias, against what the contributor summed on the device and reduced over ranks."""

import math

import numpy as np
import pytest
import torch

import integrity_jobs as ij
from megatron_moe_probe import router_health
from megatron_moe_probe.cpu.cluster import TinyMoEConfig, run_ranks


def numpy_health(calls, biases, topk, score_function):
    out = {}
    for slot in sorted({c[0] for c in calls}):
        logits = np.concatenate([c[1] for c in calls if c[0] == slot])
        routing = np.concatenate([c[2] for c in calls if c[0] == slot])
        if score_function == "sigmoid":
            scores = 1 / (1 + np.exp(-logits))
            dist = scores / scores.sum(1, keepdims=True)
        else:
            e = np.exp(logits - logits.max(1, keepdims=True))
            scores = dist = e / e.sum(1, keepdims=True)
        bias = np.asarray(biases[slot]) if slot in biases else 0.0
        top = -np.sort(-(scores + bias), axis=1)
        load = routing.sum(0).astype(np.float64)
        p_aux = dist.mean(0) / dist.mean(0).sum()
        row = {
            "score_entropy": float(-(dist * np.log(dist)).sum(1).mean()),
            "topk_margin": float((top[:, topk - 1] - top[:, topk]).mean()),
            "aux_load_tv": float(0.5 * np.abs(p_aux - load / load.sum()).sum()),
            "maxvio": float(load.max() / load.mean() - 1),
            "tpe_min": load.min(), "tpe_max": load.max(), "tpe_std": float(load.std()),
            **{f"tpe_p{p}": float(np.percentile(load, p)) for p in (50, 90, 99)},
        }
        if slot in biases:
            row["bias_load_corr"] = float(np.corrcoef(bias, load)[0, 1])
        out[slot + 1] = row
    return out


@pytest.mark.parametrize("score_function", ["sigmoid"])
def test_router_health_matches_numpy_on_the_routers_outputs(score_function):
    cfg = TinyMoEConfig(extra={"moe_router_enable_expert_bias": True, "moe_router_score_function": score_function,
                               "moe_router_topk_scaling_factor": 1.0})
    results = run_ranks(ij.router_health, 2, cfg)
    calls = [c for r in results for c in r["calls"]]
    assert len(calls) == 2 * 2 * cfg.num_layers  # ranks x iterations x layers, every one counted
    expected = numpy_health(calls, results[0]["biases"], cfg.topk, score_function)
    for r in results:
        block = r["block"]
        assert block["layers"] == sorted(expected)
        for layer, row in expected.items():
            got = block["per_layer"][block["layers"].index(layer)]
            for stat, value in row.items():
                assert got[stat] == pytest.approx(value, rel=1e-6, abs=1e-9), (layer, stat)
            assert block["per_expert"]["expert_bias"][block["layers"].index(layer)] == pytest.approx(results[0]["biases"][layer - 1])
        worst = max(expected, key=lambda layer: expected[layer]["maxvio"])
        assert block["across_layers"]["maxvio"]["worst_layer"] == worst
        assert block["across_layers"]["maxvio"]["max"] == pytest.approx(expected[worst]["maxvio"])


def test_softmax_router_health_without_megatron():
    """The accumulator alone on hand-made logits: softmax scores, no bias, two calls summed."""
    g = torch.Generator().manual_seed(3)
    acc = router_health.RouterHealthAccumulator(1, 6, torch.device("cpu"))
    calls = []
    for _ in range(2):
        logits = torch.randn(50, 6, generator=g, dtype=torch.float64)
        top = logits.topk(2, dim=1).indices
        routing = torch.zeros(50, 6, dtype=torch.bool).scatter_(1, top, True)
        acc.record(0, logits, routing, topk=2, score_function="softmax")
        calls.append((0, logits.numpy(), routing.numpy()))
    block = router_health.summarize(acc.floats, acc.ints, acc, [0])
    expected = numpy_health(calls, {}, 2, "softmax")[1]
    for stat, value in expected.items():
        assert block["per_layer"][0][stat] == pytest.approx(value, rel=1e-5), stat
    assert math.isnan(block["per_layer"][0]["bias_load_corr"])
    assert "expert_bias" not in block["per_expert"]
