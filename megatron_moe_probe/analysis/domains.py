"""Routing by domain and over time: per-domain expert popularity, divergence between domains
and across a run's windows (drift), placements fitted on one domain and tested on the others,
runs compared by batch size, and mock against real data.

Popularity of expert e in layer l for a set of counts c: p_e = c_e / Σ c (a distribution over
experts). Divergence is Jensen–Shannon with log base 2, so it lies in [0, 1]:

    JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),  m = (p + q) / 2,  0·log 0 = 0

(its square root is a metric). Seed 003 fits an expert placement on one task family and
tests it on another; here the families are the blend's datasets (docs/analysis.md §6–9).
"""

from __future__ import annotations

import math

import torch

from megatron_moe_probe import stats
from megatron_moe_probe.analysis import placement as placement_mod
from megatron_moe_probe.analysis.runs import RunWindow, layer_imbalance
from megatron_moe_probe.analysis.whatif import check_ep
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.values import nan_median


def popularity(counts: torch.Tensor) -> torch.Tensor:
    """[..., E] counts -> [..., E] shares (NaN where a row has no tokens)."""
    c = counts.to(torch.float64)
    total = c.sum(-1, keepdim=True)
    return torch.where(total > 0, c / total.clamp_min(1e-300), torch.full_like(c, math.nan))


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[..., E] distributions -> [...] Jensen–Shannon divergence, log base 2 (0 = same, 1 = disjoint)."""
    m = (p + q) / 2

    def kl(a, b):
        terms = torch.where(a > 0, a * torch.log2(a / b.clamp_min(1e-300)), torch.zeros_like(a))
        return terms.sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def domain_section(window: RunWindow, ep: int) -> dict | None:
    """Everything about the window's domains, or None when the run recorded none."""
    found = window.domain_counts()
    if found is None:
        return None
    names, per_interval = found
    counts = per_interval.sum(0)  # [D, L, E]
    D = len(names)
    pop = popularity(counts)
    divergence = [[js_divergence(pop[a], pop[b]).tolist() for b in range(D)] for a in range(D)]  # [D][D][L]
    tokens = counts.sum(-1)  # [D, L]
    return {
        "names": names,
        "tokens": tokens[:, 0].tolist() if tokens.shape[1] else [],
        "share": (tokens[:, 0].double() / tokens[:, 0].sum().clamp_min(1)).tolist() if tokens.shape[1] else [],
        "popularity": pop.tolist(),  # [D][L][E]
        "divergence": divergence,
        "divergence_median": [[nan_median(divergence[a][b]) for b in range(D)] for a in range(D)],
        "gini": stats.gini(counts.to(torch.float64)).tolist(),  # [D][L]
        "cross_domain_placement": cross_domain_placement(counts, names, ep),
    }


def cross_domain_placement(counts: torch.Tensor, names: list[str], ep: int) -> dict:
    """Seed 003's table on our counts: a balanced placement (E/EP experts per rank) fitted on
    each domain's counts, judged on every domain by the busiest rank over the mean rank, per
    layer, beside Megatron's contiguous placement on the same test domain. `gain` is
    contiguous / fitted (> 1: the fitted placement helps); the diagonal is in-domain."""
    D, L, E = counts.shape
    check_ep(E, ep)
    contiguous = placement_mod.contiguous_placement(E, ep)
    fitted = [[placement_mod.balanced_placement(counts[d, layer].tolist(), ep) for layer in range(L)] for d in range(D)]
    contig = [[placement_mod.busiest_over_mean(contiguous, counts[t, layer].tolist()) for layer in range(L)]
              for t in range(D)]
    table = []
    for f in range(D):
        row = []
        for t in range(D):
            placed = [placement_mod.busiest_over_mean(fitted[f][layer], counts[t, layer].tolist()) for layer in range(L)]
            gain = [c / p if p and not math.isnan(p) else math.nan for c, p in zip(contig[t], placed)]
            row.append({"fit": names[f], "test": names[t], "busiest_over_mean": placed, "contiguous": contig[t],
                        "gain": gain, "gain_median": nan_median(gain)})
        table.append(row)
    in_domain = [table[d][d]["gain_median"] for d in range(D)]
    cross = [table[f][t]["gain_median"] for f in range(D) for t in range(D) if f != t]
    return {"ep": ep, "table": table, "in_domain_gain_median": nan_median(in_domain),
            "cross_domain_gain_median": nan_median(cross)}


def drift_section(window: RunWindow, windows: int = 4) -> dict:
    """Expert popularity across the run: the intervals cut into `windows` consecutive groups
    (as equal as the interval count allows); JS divergence of each group from the first and
    from the one before, per layer."""
    per_interval = window.tokens_per_expert()  # [I, L, E]
    n = per_interval.shape[0]
    k = max(1, min(windows, n))
    bounds = [round(i * n / k) for i in range(k + 1)]
    groups = [per_interval[a:b].sum(0) for a, b in zip(bounds, bounds[1:])]
    pops = [popularity(g) for g in groups]
    reports = window.reports
    spans = [f"{reports[a].step - reports[a].steps + 1}-{reports[b - 1].step}" for a, b in zip(bounds, bounds[1:])]
    return {"windows": spans,
            "from_first": [js_divergence(pops[0], p).tolist() for p in pops],  # [W][L]
            "from_previous": [[math.nan] * len(window.layers)] + [js_divergence(a, b).tolist()
                                                                   for a, b in zip(pops, pops[1:])]}


def _batch_setting(window: RunWindow) -> dict:
    mbs = window.setting("micro_batch_size")
    seq = window.setting("seq_length")
    gbs = window.setting("global_batch_size")
    gbs = gbs and gbs[0]
    return {"micro_batch_size": mbs and mbs[0], "global_batch_size": gbs, "seq_length": seq and seq[0]}


def run_summary(window: RunWindow) -> dict:
    """One row of a run comparison: batch size, tokens per iteration, imbalance per iteration
    (mean over iterations, median over layers) and on the window's sums."""
    imbalance = layer_imbalance(window)
    counts = window.tokens_per_expert()
    iterations = sum(r.steps for r in window.reports)
    row = {"run": str(window.path), **_batch_setting(window),
           "assignments_per_iteration": float(counts.sum()) / max(iterations, 1) / max(len(window.layers), 1),
           "iterations": iterations}
    for stat in ("gini", "max_over_mean", "rank_max_over_mean"):
        if stat in imbalance:
            row[f"{stat}_step"] = nan_median(imbalance[stat]["step"])
            row[f"{stat}_window"] = nan_median(imbalance[stat]["window"])
        else:
            row[f"{stat}_step"] = nan_median(window.step_mean(stat))
    return row


def batch_size_sweep(windows: list[RunWindow]) -> dict:
    """Runs of one model and data at different batch sizes, sorted by global batch size (then
    micro-batch): DODOCO reports that batch size moves routing imbalance."""
    if len({w.num_experts for w in windows}) > 1:
        raise UsageError("--sweep: the runs have different numbers of experts; sweep one model")
    rows = [run_summary(w) for w in windows]
    rows.sort(key=lambda r: (r["global_batch_size"] or 0, r["micro_batch_size"] or 0))
    return {"runs": rows}


def direction(ratio: float, a: str, b: str, what: str = "per-iteration Gini") -> str:
    """The mock-vs-real sentence, whichever way the data goes."""
    if math.isnan(ratio):
        return f"{what}: not comparable (missing values)"
    if abs(ratio - 1) < 0.02:
        return f"{what}: {a} and {b} about equal (median ratio {ratio:.3f})"
    return f"{what}: {a} {'higher' if ratio > 1 else 'lower'} than {b} (median ratio A/B {ratio:.3f})"
