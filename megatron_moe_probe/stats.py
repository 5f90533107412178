"""Imbalance statistics from token counts. Pure torch, no I/O, no Megatron.

Every function reduces over the last dimension and keeps the leading ones, so
the same call works for one layer ([E]), all layers ([L, E]) or every step of
an interval ([S, L, E]), on CPU or GPU tensors. Counts are converted to float64
first, so results are exact enough to compare against an independent
implementation. Where a statistic is undefined (no tokens at all) the result
is NaN; the interval summaries below ignore NaNs.

The formulas are written out in docs/metrics.md; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_moe_probe import record

LOCAL, INTRA_NODE, INTER_NODE = 0, 1, 2
LOCALITY_NAMES = ("local", "intra_node", "inter_node")


def _f64(counts: torch.Tensor) -> torch.Tensor:
    return counts.to(torch.float64)


def _nan_where_empty(values: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return torch.where(total > 0, values, torch.full_like(values, float("nan")))


def max_over_mean(counts: torch.Tensor) -> torch.Tensor:
    """Busiest bin against the average bin (DODOCO's per-expert max/mean); 1.0 is perfect balance."""
    x = _f64(counts)
    mean = x.mean(-1)
    return _nan_where_empty(x.amax(-1) / mean.clamp_min(1e-300), mean)


def min_over_mean(counts: torch.Tensor) -> torch.Tensor:
    x = _f64(counts)
    mean = x.mean(-1)
    return _nan_where_empty(x.amin(-1) / mean.clamp_min(1e-300), mean)


def gini(counts: torch.Tensor) -> torch.Tensor:
    """Gini coefficient: 0 for equal loads, (n-1)/n when one bin holds everything.

    G = sum_i (2i - n - 1) x_(i) / (n * sum x), with x sorted ascending and i = 1..n.
    """
    x = _f64(counts).sort(-1).values
    n = x.shape[-1]
    i = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    total = x.sum(-1)
    g = ((2 * i - n - 1) * x).sum(-1) / (n * total).clamp_min(1e-300)
    return _nan_where_empty(g, total)


def coefficient_of_variation(counts: torch.Tensor) -> torch.Tensor:
    """Population standard deviation over mean."""
    x = _f64(counts)
    mean = x.mean(-1)
    std = x.std(-1, correction=0)
    return _nan_where_empty(std / mean.clamp_min(1e-300), mean)


def normalized_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the load distribution divided by log(n): 1.0 is uniform, 0 is one bin."""
    x = _f64(counts)
    n = x.shape[-1]
    total = x.sum(-1, keepdim=True)
    p = x / total.clamp_min(1e-300)
    h = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
    h = h / torch.log(torch.tensor(float(n), dtype=torch.float64)) if n > 1 else torch.ones_like(h)
    return _nan_where_empty(h, total.squeeze(-1))


def dead_count(counts: torch.Tensor) -> torch.Tensor:
    """Number of bins (experts) that received no token."""
    return (counts == 0).sum(-1)


def per_rank_load(tokens_per_expert: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Tokens each EP rank's experts receive. Megatron places experts contiguously:
    rank r owns experts [r*E/EP, (r+1)*E/EP)."""
    num_experts = tokens_per_expert.shape[-1]
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"{num_experts} experts cannot be split evenly over EP={ep_size}")
    return tokens_per_expert.reshape(*tokens_per_expert.shape[:-1], ep_size, num_experts // ep_size).sum(-1)


def rank_matrix_from_source_counts(source_expert_counts: torch.Tensor, ep_size: int) -> torch.Tensor:
    """[..., EP_src, E] token-expert assignments made on each source rank -> [..., EP_src, EP_dst]."""
    return per_rank_load(source_expert_counts, ep_size)


def receiver_skew(rank_matrix: torch.Tensor) -> torch.Tensor:
    """Max tokens received by one rank over the mean received, from a [..., src, dst] matrix."""
    return max_over_mean(rank_matrix.sum(-2))


def sender_skew(rank_matrix: torch.Tensor) -> torch.Tensor:
    return max_over_mean(rank_matrix.sum(-1))


def node_of_ranks(global_ranks: list[int], gpus_per_node: int) -> list[int]:
    """Node index of each global rank, assuming ranks are numbered node by node."""
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
    return [r // gpus_per_node for r in global_ranks]


def locality_classes(source_node: int, destination_nodes: list[int], source_index: int) -> torch.Tensor:
    """Class of each destination (LOCAL for the source itself, INTRA_NODE, INTER_NODE) as [EP] long."""
    out = [
        LOCAL if d == source_index else (INTRA_NODE if node == source_node else INTER_NODE)
        for d, node in enumerate(destination_nodes)
    ]
    return torch.tensor(out, dtype=torch.long)


def locality_matrix(nodes: list[int]) -> torch.Tensor:
    """[src, dst] locality class (LOCAL, INTRA_NODE, INTER_NODE) of every pair of an EP group
    whose rank i runs on node `nodes[i]`."""
    node = torch.tensor(nodes)
    classes = torch.full((len(nodes), len(nodes)), INTER_NODE, dtype=torch.long)
    classes[node[:, None] == node[None, :]] = INTRA_NODE
    classes[torch.eye(len(nodes), dtype=torch.bool)] = LOCAL
    return classes


def locality_onehot(classes) -> torch.Tensor:
    """[..., 3] int64 one-hot of locality classes (LOCAL, INTRA_NODE, INTER_NODE): a class per
    destination rank, or the [src, dst] matrix of `locality_matrix`."""
    return torch.nn.functional.one_hot(torch.as_tensor(classes, dtype=torch.long), 3)


def locality_split(rank_matrix: torch.Tensor, nodes: list[int]) -> torch.Tensor:
    """Split a [..., EP, EP] matrix of one EP group into [..., 3] local / intra-node / inter-node volume."""
    ep = rank_matrix.shape[-1]
    if len(nodes) != ep:
        raise ValueError(f"need the node of each of the {ep} EP ranks, got {len(nodes)}")
    onehot = locality_onehot(locality_matrix(nodes)).to(rank_matrix.dtype)  # [src, dst, 3]
    return (rank_matrix.unsqueeze(-1) * onehot).sum((-3, -2))


# Statistics reported per layer: name (record.EXPERT_STATS, in its order) -> (function of
# counts, which way is worse). "worse" is +1 when larger is more imbalanced, -1 when smaller is.
EXPERT_STATS = dict(zip(record.EXPERT_STATS, (
    (max_over_mean, +1),
    (min_over_mean, -1),
    (gini, +1),
    (coefficient_of_variation, +1),
    (normalized_entropy, -1),
    (dead_count, +1),
), strict=True))


def expert_stats(tokens_per_expert: torch.Tensor) -> dict[str, torch.Tensor]:
    """All per-expert statistics of [..., E] counts."""
    return {name: fn(tokens_per_expert).to(torch.float64) for name, (fn, _) in EXPERT_STATS.items()}


def layer_stats(tokens_per_expert: torch.Tensor, ep_size: int) -> dict[str, torch.Tensor]:
    """Per-expert statistics plus per-EP-rank load balance and receiver skew of [..., E] counts.

    The receiver side of the all-to-all is the rank owning the expert, so receiver
    skew of the dispatch equals max/mean of per-rank load; it is reported under both
    names because the two are read by different people (the matrix gives the sender side).
    """
    out = expert_stats(tokens_per_expert)
    rank_load = per_rank_load(tokens_per_expert, ep_size)
    out["rank_max_over_mean"] = max_over_mean(rank_load)
    out["tokens"] = _f64(tokens_per_expert).sum(-1)
    return out


@dataclass(frozen=True)
class Summary:
    """A per-step statistic summarized over a log interval."""

    mean: float
    worst: float


def summarize_steps(per_step: torch.Tensor, worse: int) -> Summary:
    """Mean and worst value of a per-step statistic [S], ignoring NaN steps."""
    x = per_step.to(torch.float64)
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return Summary(float("nan"), float("nan"))
    worst = x.max() if worse > 0 else x.min()
    return Summary(float(x.mean()), float(worst))


def worse_direction(stat_name: str) -> int:
    if stat_name in EXPERT_STATS:
        return EXPERT_STATS[stat_name][1]
    return +1
