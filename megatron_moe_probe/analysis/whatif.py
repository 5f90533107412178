"""EP what-if: the per-EP-rank load a run's routing would give at other EP degrees.

Routing is taken as independent of EP (DODOCO measured EP 4-32 moving per-expert max/mean
by at most 5%), so the recorded per-expert counts are regrouped per rank with Megatron's
contiguous placement: rank r holds experts [r*E/EP, (r+1)*E/EP).
"""

from __future__ import annotations

import torch

from megatron_moe_probe import stats
from megatron_moe_probe.errors import UsageError


def ep_degrees(num_experts: int) -> list[int]:
    """Every EP degree above 1 that divides the experts evenly (Megatron requires E % EP == 0)."""
    return [d for d in range(2, num_experts + 1) if num_experts % d == 0]


def check_ep(num_experts: int, ep: int) -> None:
    if ep < 1:
        raise UsageError(f"EP must be a positive integer, got {ep}")
    if num_experts % ep:
        raise UsageError(f"EP={ep} does not divide {num_experts} experts evenly; "
                         f"possible: {', '.join(map(str, [1, *ep_degrees(num_experts)]))}")


def busiest_rank_over_mean(tokens_per_expert: torch.Tensor, ep: int) -> torch.Tensor:
    """[..., E] counts -> [...] busiest EP rank's tokens over the mean rank's, contiguous placement."""
    check_ep(tokens_per_expert.shape[-1], ep)
    return stats.max_over_mean(stats.per_rank_load(tokens_per_expert, ep))


def ep_scan(tokens_per_interval: torch.Tensor, eps: list[int],
            tokens_per_iteration: torch.Tensor | None = None) -> list[dict]:
    """[interval, layer, E] counts -> per EP: busiest/mean per layer on the counts summed over
    the intervals ("window") and in the worst single interval ("worst_interval"); with the
    per-iteration records [iteration, layer, E], also the mean over iterations of each
    iteration's own busiest/mean ("iteration_mean", what a GPU waits for on average) and the
    worst iteration ("worst_iteration"); None without them."""
    out = []
    for ep in eps:
        row = {"ep": ep,
               "window": busiest_rank_over_mean(tokens_per_interval.sum(0), ep).tolist(),
               "worst_interval": busiest_rank_over_mean(tokens_per_interval, ep).amax(0).tolist(),
               "iteration_mean": None, "worst_iteration": None}
        if tokens_per_iteration is not None and tokens_per_iteration.shape[0]:
            per_it = busiest_rank_over_mean(tokens_per_iteration, ep)  # [S, L]
            row["iteration_mean"] = per_it.nanmean(0).tolist()
            row["worst_iteration"] = per_it.nan_to_num(0).amax(0).tolist()
        out.append(row)
    return out


def modelled_rank_matrix(tokens_per_expert: torch.Tensor, ep: int) -> torch.Tensor:
    """[..., E] counts -> [..., src, dst] matrix assuming tokens originate uniformly across
    the source ranks: M[s, r] = L_r / EP, with L_r the load of rank r's experts."""
    check_ep(tokens_per_expert.shape[-1], ep)
    load = stats.per_rank_load(tokens_per_expert.to(torch.float64), ep) / ep
    return load.unsqueeze(-2).expand(*load.shape[:-1], ep, ep)


def received_from_others(rank_matrix: torch.Tensor) -> torch.Tensor:
    """[..., src, dst] -> [..., dst] tokens each rank receives from the other ranks (the
    all-to-all's traffic; the diagonal stays on the GPU)."""
    return rank_matrix.sum(-2) - rank_matrix.diagonal(dim1=-2, dim2=-1)


def matrix_check(measured: torch.Tensor, tokens_per_expert: torch.Tensor) -> list[dict[str, float]]:
    """Measured [layer, src, dst] matrix against the uniform-source model from [layer, E] counts.

    Column sums (tokens received, local included) agree by construction, because every
    assignment goes to the rank owning its expert; what the model assumes is how that load
    splits over source ranks, which shows in the cells, the local share and the sender skew."""
    ep = measured.shape[-1]
    measured = measured.to(torch.float64)
    model = modelled_rank_matrix(tokens_per_expert, ep)
    cell_error = ((measured - model).abs() / model.clamp_min(1e-300)).amax((-2, -1))
    local = measured.diagonal(dim1=-2, dim2=-1).sum(-1) / measured.sum((-2, -1))
    rows = zip(cell_error.tolist(), local.tolist(), stats.sender_skew(measured).tolist(),
               stats.max_over_mean(received_from_others(measured)).tolist(),
               stats.max_over_mean(received_from_others(model)).tolist())
    return [
        {"max_cell_rel_error": err, "local_fraction_measured": loc, "local_fraction_modelled": 1 / ep,
         "sender_skew_measured": send, "sender_skew_modelled": 1.0,
         "receiver_skew_from_others_measured": recv, "receiver_skew_from_others_modelled": recv_model}
        for err, loc, send, recv, recv_model in rows
    ]
