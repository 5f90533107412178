"""Two runs of one model compared layer by layer (e.g. mock tokens against real text).

DODOCO reports that mock-token benchmarks overestimate routing Gini; this puts a run's
Gini, max/mean and entropy beside another's, with the ratio, on the same layers.
"""

from __future__ import annotations

import math

from megatron_moe_probe.values import nan_median
from megatron_moe_probe.analysis.runs import IMBALANCE_STATS, RunWindow, layer_imbalance
from megatron_moe_probe.errors import UsageError

BASES = ("step", "window")


def _ratio(a: float, b: float) -> float:
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def compare_runs(run: RunWindow, against: RunWindow) -> dict:
    """Per common layer, per statistic and basis (see `layer_imbalance`): run, against and
    run/against; plus the median ratio over layers."""
    if run.num_experts != against.num_experts:
        raise UsageError(f"{run.path} has {run.num_experts} experts and {against.path} {against.num_experts}; "
                         "compare runs of one model")
    common = [n for n in run.layers if n in against.layers]
    if not common:
        raise UsageError(f"{run.path} and {against.path} share no MoE layer")
    a, b = layer_imbalance(run), layer_imbalance(against)
    pos_a = [run.layers.index(n) for n in common]
    pos_b = [against.layers.index(n) for n in common]
    layers = []
    for ia, ib, number in zip(pos_a, pos_b, common):
        row: dict = {"layer": number}
        for stat in IMBALANCE_STATS:
            row[stat] = {basis: {"run": a[stat][basis][ia], "against": b[stat][basis][ib],
                                 "ratio": _ratio(a[stat][basis][ia], b[stat][basis][ib])} for basis in BASES}
        layers.append(row)
    median_ratio = {stat: {basis: nan_median([row[stat][basis]["ratio"] for row in layers]) for basis in BASES}
                    for stat in IMBALANCE_STATS}
    recorded = all(not math.isnan(row["gini"]["step"][k]) for row in layers for k in ("run", "against"))
    basis = "step" if recorded else "window"
    from megatron_moe_probe.analysis.domains import direction

    what = "per-iteration Gini" if recorded else "window Gini"
    return {"run": str(run.path), "against": str(against.path), "layers": layers, "median_ratio": median_ratio,
            "basis": basis, "direction": direction(median_ratio["gini"][basis], "A", "B", what)}
