"""All-to-all cost model with receiver skew.

One dispatch is modelled as

    t = latency + max over ranks r of max(in_intra_r / B_intra, out_intra_r / B_intra,
                                          in_inter_r / B_inter, out_inter_r / B_inter)

with in/out the bytes rank r receives from / sends to the other ranks of its EP group
(its own tokens stay on the GPU), split by whether the peer is on the same node (EP rank
r on node r // gpus_per_node: the EP group is taken to be consecutive global ranks, as with
TP=1 in Megatron's default rank order). Links are full duplex and the NVLink and network
paths run concurrently, hence the max. Combine moves the same tokens back (the matrix
transposed): every rank's in and out swap, so its time is the same as the dispatch's.

The skew penalty is t(recorded routing) / t(same volume, balanced). NeuSim's parametric
form of the same skew (an imbalance factor f and W hot experts, worst device holding
ceil(E/EP) experts) is `worst_device_skew`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_moe_probe import stats
from megatron_moe_probe.analysis.whatif import received_from_others
from megatron_moe_probe.errors import UsageError


@dataclass(frozen=True)
class Fabric:
    """Per-GPU bandwidth per direction in GB/s (1e9 bytes/s), latency of one all-to-all."""

    # NVLink 4 on H100/H200 SXM: 900 GB/s bidirectional per GPU, so 450 per direction (spec
    # peak; measured all-to-all reaches less, so modelled times are optimistic).
    intra_node_gb_s: float = 450.0
    # One 400 Gb/s NIC per GPU (HGX H100/H200 with ConnectX-7): 50 GB/s per direction.
    inter_node_gb_s: float = 50.0
    # Ours: a fixed start-up cost per all-to-all, of the order NCCL shows for small messages.
    latency_us: float = 10.0
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if not (self.intra_node_gb_s > 0 and self.inter_node_gb_s > 0):
            raise UsageError(f"bandwidths must be positive, got intra-node {self.intra_node_gb_s} "
                             f"and inter-node {self.inter_node_gb_s} GB/s")
        if not self.latency_us >= 0:
            raise UsageError(f"latency must be >= 0 us, got {self.latency_us}")
        if self.gpus_per_node < 1:
            raise UsageError(f"gpus per node must be >= 1, got {self.gpus_per_node}")


def all_to_all_seconds(matrix_bytes: torch.Tensor, fabric: Fabric) -> torch.Tensor:
    """[..., src, dst] bytes of one all-to-all -> [...] modelled seconds."""
    ep = matrix_bytes.shape[-1]
    classes = stats.locality_matrix(stats.node_of_ranks(list(range(ep)), fabric.gpus_per_node))
    m = matrix_bytes.to(torch.float64)
    intra, inter = m * (classes == stats.INTRA_NODE), m * (classes == stats.INTER_NODE)
    b_intra, b_inter = fabric.intra_node_gb_s * 1e9, fabric.inter_node_gb_s * 1e9
    per_rank = torch.stack([intra.sum(-2) / b_intra, intra.sum(-1) / b_intra,
                            inter.sum(-2) / b_inter, inter.sum(-1) / b_inter], -1).amax(-1)
    return fabric.latency_us * 1e-6 + per_rank.amax(-1)


def dispatch_cost(rank_matrix: torch.Tensor, assignments_per_rank: float, bytes_per_assignment: float,
                  fabric: Fabric) -> list[dict[str, float]]:
    """Per layer of a [layer, src, dst] matrix (recorded or modelled, any scale: only its
    shape is used): one dispatch in which every rank routes `assignments_per_rank`
    token-expert assignments, against the same volume spread evenly over all rank pairs."""
    ep = rank_matrix.shape[-1]
    total = assignments_per_rank * ep * bytes_per_assignment
    m = rank_matrix.to(torch.float64)
    skewed = m / m.sum((-2, -1), keepdim=True).clamp_min(1e-300) * total
    balanced = torch.full((ep, ep), total / ep**2, dtype=torch.float64)
    t_skewed = all_to_all_seconds(skewed, fabric)
    t_balanced = float(all_to_all_seconds(balanced, fabric))
    from_others = received_from_others(skewed)
    return [{"max_bytes_received": b, "balanced_bytes_received": total / ep * (ep - 1) / ep,
             "balanced_us": t_balanced * 1e6, "skewed_us": t * 1e6, "penalty": t / t_balanced}
            for b, t in zip(from_others.amax(-1).tolist(), t_skewed.tolist())]


def worst_device_skew(num_experts: int, topk: int, ep: int, imbalance_factor: float = -1.0,
                      hot_experts: int = 1) -> float:
    """NeuSim-style receiver skew: W hot experts each get f times the mean expert load, the
    other experts share the remaining tokens evenly, and the worst device holds ceil(E/EP)
    experts, as many of them hot as fit. Returns its load over the mean device load.

    f = -1 means the worst case f = E/K (a hot expert receives every token)."""
    for name, value in (("experts", num_experts), ("top-k", topk), ("EP", ep), ("hot experts", hot_experts)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if topk > num_experts:
        raise UsageError(f"top-k ({topk}) cannot exceed the number of experts ({num_experts})")
    if ep > num_experts:
        raise UsageError(f"EP ({ep}) cannot exceed the number of experts ({num_experts})")
    if hot_experts > num_experts:
        raise UsageError(f"hot experts ({hot_experts}) cannot exceed the number of experts ({num_experts})")
    most = num_experts / topk  # a hot expert cannot receive more than every token
    f = most if imbalance_factor == -1 else imbalance_factor
    if not 1 <= f <= most:
        raise UsageError(f"imbalance factor must be -1 (worst case E/K) or in [1, E/K = {most:g}], got {imbalance_factor}")
    if hot_experts * f > num_experts * (1 + 1e-12):
        raise UsageError(f"{hot_experts} hot experts at {f:g}x the mean would take more than all tokens "
                         f"(need W*f <= E = {num_experts})")
    on_worst = math.ceil(num_experts / ep)
    hot_on_worst = min(hot_experts, on_worst)
    others = num_experts - hot_experts
    other_share = (num_experts - hot_experts * f) / others if others else 0.0
    return (hot_on_worst * f + (on_worst - hot_on_worst) * other_share) * ep / num_experts


def iteration_penalties(rank_matrices: torch.Tensor, assignments_per_rank: float, bytes_per_assignment: float,
                        fabric: Fabric) -> torch.Tensor:
    """[iteration, layer, src, dst] matrices (one per iteration, recorded or modelled) ->
    [iteration, layer] skew penalty of each iteration's dispatch (each scaled as in
    `dispatch_cost`): the worst device of that iteration, not of the window's average."""
    ep = rank_matrices.shape[-1]
    total = assignments_per_rank * ep * bytes_per_assignment
    m = rank_matrices.to(torch.float64)
    skewed = m / m.sum((-2, -1), keepdim=True).clamp_min(1e-300) * total
    balanced = float(all_to_all_seconds(torch.full((ep, ep), total / ep**2, dtype=torch.float64), fabric))
    return all_to_all_seconds(skewed, fabric) / balanced
