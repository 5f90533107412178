"""Per-micro-batch replication of hot experts (MoonEP / UltraEP), maxvio, and when a static
relayout of the experts pays for moving them.

placement.py judges placements fitted once on a window. The dispatchers MoonEP and UltraEP do
something else: every micro-batch they look at the router's counts and copy a few hot experts
onto ranks with spare capacity, so what each rank computes is close to the mean. This module
models that beside the static placement:

- `maxvio(loads)` = max load / mean load - 1, MoonEP's imbalance metric (0 is perfect balance);
  applied here to what each EP rank computes (rank loads), the quantity a barrier waits on.
- `replicate_hot_experts(counts, ep, slots)`: greedy model of per-micro-batch replication. While
  a rank holds a free replica slot, the busiest rank hands part of its hottest expert's tokens to
  a copy of that expert on the least loaded rank that still has a slot: half the gap between the
  two, at most the tokens the busiest rank still computes for that expert. Each copy costs one
  expert's weights moved (MoonEP prefetches them over NVLink). This is a model of the idea, not
  of either library's planner, so its numbers are what such a planner could reach, no more.
- `relayout_decision`: a static relayout (placement.balanced_placement, fitted on one window)
  saves the busiest rank's excess tokens every iteration; moving the experts costs their bytes
  over the link once. It pays off when saving x iterations until the next relayout exceeds the
  cost. Times come from the caller (seconds per token on the busiest rank, link GB/s), so the
  rule states its assumptions instead of hiding them.

The probe records counts per iteration, not per micro-batch: an iteration's counts are the sum of
its micro-batches, whose own imbalance is at least as large. The per-iteration numbers here are
therefore a lower bound on what a per-micro-batch dispatcher would see.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_moe_probe.analysis.placement import balanced_placement, contiguous_placement, rank_loads
from megatron_moe_probe.analysis.whatif import check_ep
from megatron_moe_probe.errors import UsageError


def maxvio(loads: Sequence[float]) -> float:
    """max / mean - 1 of non-negative loads; 0.0 when they are all zero."""
    values = [float(x) for x in loads]
    if not values:
        raise UsageError("maxvio of no loads")
    mean = sum(values) / len(values)
    return 0.0 if mean == 0 else max(values) / mean - 1.0


def replicate_hot_experts(counts: Sequence[float], ep: int, slots_per_rank: int) -> dict:
    """One micro-batch's per-expert counts under contiguous placement, then with up to
    `slots_per_rank` replica slots on every rank filled greedily (see the module text)."""
    num_experts = len(counts)
    check_ep(num_experts, ep)
    if slots_per_rank < 0:
        raise UsageError(f"slots per rank must be >= 0, not {slots_per_rank}")
    home = contiguous_placement(num_experts, ep)
    owner = {e: r for r, experts in enumerate(home) for e in experts}
    # share[r][e]: tokens of expert e that rank r computes.
    share = [{e: float(counts[e]) for e in experts} for experts in home]
    static = [sum(s.values()) for s in share]
    free = [slots_per_rank] * ep
    replicas: list[dict] = []
    while True:
        load = [sum(s.values()) for s in share]
        busiest = max(range(ep), key=lambda r: (load[r], -r))
        takers = [r for r in range(ep) if free[r] > 0 and r != busiest]
        if not takers:
            break
        target = min(takers, key=lambda r: (load[r], r))
        # The busiest rank's hottest expert that the target does not hold yet.
        options = [(tok, e) for e, tok in share[busiest].items() if e not in share[target] and tok > 0]
        if not options:
            break
        tokens, expert = max(options, key=lambda o: (o[0], -o[1]))
        move = min(tokens, (load[busiest] - load[target]) // 2)
        if move <= 0:
            break
        share[busiest][expert] -= move
        share[target][expert] = move
        free[target] -= 1
        replicas.append({"expert": expert, "home": owner[expert], "from": busiest, "to": target, "tokens": move})
    final = [sum(s.values()) for s in share]
    return {"rank_loads_static": static, "rank_loads_replicated": final,
            "maxvio_static": maxvio(static), "maxvio_replicated": maxvio(final),
            "replicas": replicas, "weights_moved": len(replicas)}


def replication_section(iteration_counts: torch.Tensor, ep: int, slots_per_rank: int = 1) -> dict:
    """Per layer of [iteration, layer, expert] counts: mean maxvio of the ranks per iteration
    with static contiguous placement and with per-iteration replication, and the mean number of
    expert weights each iteration would move."""
    if iteration_counts.dim() != 3:
        raise UsageError("replication needs [iteration, layer, expert] counts")
    layers = []
    for layer in range(iteration_counts.shape[1]):
        runs = [replicate_hot_experts(row.tolist(), ep, slots_per_rank) for row in iteration_counts[:, layer]]
        n = max(len(runs), 1)
        layers.append({"maxvio_static": sum(r["maxvio_static"] for r in runs) / n,
                       "maxvio_replicated": sum(r["maxvio_replicated"] for r in runs) / n,
                       "weights_moved_per_iteration": sum(r["weights_moved"] for r in runs) / n})
    return {"ep": ep, "slots_per_rank": slots_per_rank, "iterations": int(iteration_counts.shape[0]),
            "basis": "per iteration (sum of its micro-batches): a lower bound on per-micro-batch imbalance",
            "layers": layers}


def relayout_decision(fit_loads: Sequence[float], ep: int, *, seconds_per_token: float, expert_bytes: float,
                      link_gb_s: float, iterations: int, test_loads: Sequence[float] | None = None) -> dict:
    """Does a static relayout fitted on `fit_loads` (per-expert tokens per iteration) pay for
    moving the experts within `iterations` iterations? Judged on `test_loads` when given (the
    loads the new layout will meet), else on `fit_loads`."""
    if seconds_per_token <= 0 or expert_bytes <= 0 or link_gb_s <= 0 or iterations < 1:
        raise UsageError("relayout needs positive seconds per token, expert bytes, link GB/s and iterations >= 1")
    num_experts = len(fit_loads)
    check_ep(num_experts, ep)
    judge = list(test_loads) if test_loads is not None else list(fit_loads)
    before = contiguous_placement(num_experts, ep)
    after = balanced_placement(list(fit_loads), ep)
    if max(rank_loads(after, fit_loads)) >= max(rank_loads(before, fit_loads)):
        after = before  # no better layout on the fitting window: move nothing
    max_before, max_after = max(rank_loads(before, judge)), max(rank_loads(after, judge))
    home_before = {e: r for r, experts in enumerate(before) for e in experts}
    moved = sum(1 for r, experts in enumerate(after) for e in experts if home_before[e] != r)
    saving_s = (max_before - max_after) * seconds_per_token          # per iteration, on the busiest rank
    cost_s = moved * expert_bytes / (link_gb_s * 1e9)                # one copy of each moved expert, serially
    total = saving_s * iterations
    return {"busiest_tokens_before": max_before, "busiest_tokens_after": max_after,
            "experts_moved": moved, "saving_s_per_iteration": saving_s, "move_cost_s": cost_s,
            "iterations": iterations, "saving_s_total": total, "pays_off": total > cost_s,
            "break_even_iterations": (cost_s / saving_s) if saving_s > 0 else None,
            "mapping": after}
