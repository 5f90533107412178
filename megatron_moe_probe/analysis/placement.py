"""Expert placement and replication: which EP rank holds which experts.

Three placements of one layer's experts, each judged by the busiest rank's load over the
mean rank's (the receiver skew of the dispatch when tokens come evenly from all ranks):

- contiguous: Megatron's default, rank r holds experts [r*E/EP, (r+1)*E/EP);
- balanced: E/EP experts on every rank (the same memory as contiguous), chosen by
  longest-processing-time-first greedy and then pairwise swaps off the busiest rank;
- replicated: the R hottest experts get a second copy on another rank, each copy taking
  half of the expert's tokens (an assumption: the dispatcher splits them evenly), at the
  cost of ceil(R/EP) extra expert slots per rank.

A placement is fitted on one window of counts and should be judged on another as well:
expert popularity drifts, and a placement that only fits the past is no placement.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from megatron_moe_probe import stats
from megatron_moe_probe.analysis.whatif import check_ep
from megatron_moe_probe.errors import UsageError

# Experts held by each EP rank; a replicated expert appears on more than one rank.
Placement = list[list[int]]
STRATEGIES = ("contiguous", "balanced", "replicated")


def contiguous_placement(num_experts: int, ep: int) -> Placement:
    check_ep(num_experts, ep)
    per_rank = num_experts // ep
    return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(ep)]


def rank_loads(placement: Placement, loads: Sequence[float]) -> list[float]:
    """Tokens each rank serves; an expert's tokens are split evenly over its copies."""
    copies = Counter(e for rank in placement for e in rank)
    return [sum(float(loads[e]) / copies[e] for e in rank) for rank in placement]


def busiest_over_mean(placement: Placement, loads: Sequence[float]) -> float:
    return float(stats.max_over_mean(torch.tensor(rank_loads(placement, loads), dtype=torch.float64)))


def extra_slots_per_rank(replicated: int, ep: int) -> int:
    """Expert slots each rank needs beyond E/EP to hold `replicated` second copies."""
    return math.ceil(replicated / ep)


def _greedy(order: list[int], share: list[float], ep: int, cap: int) -> list[list[int | None]]:
    """Longest-processing-time first: each expert (copy) in `order` goes to the least loaded
    rank that has a free slot and no copy of it yet. Ranks are padded to `cap` slots with
    None (an empty slot), so that the swap search can also move an expert into one."""
    slots: list[list[int | None]] = [[] for _ in range(ep)]
    load = [0.0] * ep
    for e in order:
        eligible = [r for r in range(ep) if len(slots[r]) < cap and e not in slots[r]]
        if not eligible:
            raise UsageError(f"cannot place every copy with {cap} slots per rank on {ep} ranks; replicate fewer experts")
        r = min(eligible, key=lambda r: (load[r], r))
        slots[r].append(e)
        load[r] += share[e]
    return [rank + [None] * (cap - len(rank)) for rank in slots]


def _swap_off_busiest(slots: list[list[int | None]], share: list[float]) -> Placement:
    """Repeatedly make the best swap of a slot on the busiest rank with a slot elsewhere that
    leaves both ranks strictly below the busiest rank's load (never two copies of an expert
    on one rank); stop when none exists. Every swap lowers the busiest load or the number of
    ranks carrying it, so it ends."""
    def weight(e: int | None) -> float:
        return 0.0 if e is None else share[e]

    load = [sum(weight(e) for e in rank) for rank in slots]
    held = [set(rank) - {None} for rank in slots]
    while True:
        busiest = max(range(len(slots)), key=lambda r: (load[r], -r))
        best: tuple[float, int, int, int] | None = None
        for i, x in enumerate(slots[busiest]):
            for q, other in enumerate(slots):
                if q == busiest or x in held[q]:
                    continue
                for j, y in enumerate(other):
                    delta = weight(x) - weight(y)
                    if delta <= 0 or y in held[busiest]:
                        continue
                    peak = max(load[busiest] - delta, load[q] + delta)
                    if peak < load[busiest] and (best is None or peak < best[0]):
                        best = (peak, i, q, j)
        if best is None:
            return [[e for e in rank if e is not None] for rank in slots]
        _, i, q, j = best
        x, y = slots[busiest][i], slots[q][j]
        slots[busiest][i], slots[q][j] = y, x
        for rank, gone, came in ((busiest, x, y), (q, y, x)):
            load[rank] += weight(came) - weight(gone)
            held[rank].discard(gone)
            if came is not None:
                held[rank].add(came)


def _hottest_first(loads: Sequence[float]) -> list[int]:
    return sorted(range(len(loads)), key=lambda e: (-float(loads[e]), e))


def balanced_placement(loads: Sequence[float], ep: int) -> Placement:
    """E/EP experts per rank with the busiest rank as light as the search finds. The search
    starts from the greedy placement and from the contiguous one and keeps the better
    result, so it is never worse than contiguous on `loads`."""
    num_experts = len(loads)
    check_ep(num_experts, ep)
    cap = num_experts // ep
    share = [float(x) for x in loads]
    starts = [_greedy(_hottest_first(loads), share, ep, cap), [list(r) for r in contiguous_placement(num_experts, ep)]]
    return min((_swap_off_busiest(s, share) for s in starts), key=lambda p: max(rank_loads(p, loads)))


def replicated_placement(loads: Sequence[float], ep: int, replicated: int) -> Placement:
    """The `replicated` hottest experts on two ranks each, half their tokens on each copy,
    with E/EP + ceil(replicated/EP) slots per rank."""
    num_experts = len(loads)
    check_ep(num_experts, ep)
    if not 0 <= replicated <= num_experts:
        raise UsageError(f"can replicate 0 to {num_experts} experts, not {replicated}")
    if replicated and ep < 2:
        raise UsageError("replication needs EP >= 2 (a second copy must sit on another rank)")
    ranked = _hottest_first(loads)
    hot, rest = ranked[:replicated], ranked[replicated:]
    share = [float(x) / (2 if e in hot else 1) for e, x in enumerate(loads)]
    # Both copies of the hot experts first, while every rank still has free slots.
    order = [e for e in hot for _ in range(2)] + rest
    cap = num_experts // ep + extra_slots_per_rank(replicated, ep)
    return _swap_off_busiest(_greedy(order, share, ep, cap), share)


def placement_weights(placement: Placement, num_experts: int) -> torch.Tensor:
    """[EP, E] share of each expert's tokens each rank serves (1 / copies where it holds one)."""
    copies = Counter(e for rank in placement for e in rank)
    w = torch.zeros(len(placement), num_experts, dtype=torch.float64)
    for r, rank in enumerate(placement):
        for e in rank:
            w[r, e] += 1.0 / copies[e]
    return w


def iteration_busiest_over_mean(placement: Placement, counts: torch.Tensor) -> torch.Tensor:
    """[iteration, E] counts -> [iteration] busiest rank / mean rank of each iteration."""
    loads = counts.to(torch.float64) @ placement_weights(placement, counts.shape[-1]).T
    return stats.max_over_mean(loads)


def compare_placements(fit_loads: torch.Tensor, test_loads: torch.Tensor | None, ep: int,
                       replicated: int, test_iterations: torch.Tensor | None = None) -> list[dict]:
    """Per layer of [layer, E] counts: each strategy's mapping, fitted on `fit_loads`, and its
    busiest/mean on the fitting window ("fit") and on `test_loads` ("test", None without);
    with `test_iterations` ([iteration, layer, E] of the test window) also the mean over those
    iterations of each iteration's own busiest/mean ("test_iteration_mean")."""
    out = []
    for layer, fit in enumerate(fit_loads.tolist()):
        placements = {
            "contiguous": contiguous_placement(len(fit), ep),
            "balanced": balanced_placement(fit, ep),
            "replicated": replicated_placement(fit, ep, replicated),
        }
        test = None if test_loads is None else test_loads[layer].tolist()
        out.append({name: {"fit": busiest_over_mean(p, fit),
                           "test": None if test is None else busiest_over_mean(p, test),
                           "test_iteration_mean": None if test_iterations is None else
                           float(iteration_busiest_over_mean(p, test_iterations[:, layer]).nanmean()),
                           "mapping": p}
                    for name, p in placements.items()})
    return out
