"""Snapshot (tensors) -> IntervalReport (plain data): where the statistics are computed."""

from __future__ import annotations

import math

from megatron_moe_probe import stats
from megatron_moe_probe.probe import Snapshot
from megatron_moe_probe.report import IntervalReport

# Per-step statistics summarized over the interval as <name>_step_mean / <name>_step_worst.
STEP_SUMMARIZED = ("max_over_mean", "gini", "cv", "entropy", "dead_experts", "rank_max_over_mean")


def _f(x) -> float:
    return float(x)


def build_report(snap: Snapshot) -> IntervalReport:
    counts = snap.tokens_per_expert  # [L, E]
    interval = stats.layer_stats(counts, snap.ep_size)
    matrix = stats.rank_matrix_from_source_counts(snap.source_expert_counts, snap.ep_size)  # [L, EP, EP]
    receiver = stats.receiver_skew(matrix)
    sender = stats.sender_skew(matrix)
    per_step = stats.layer_stats(snap.step_tokens_per_expert, snap.ep_size) if snap.step_tokens_per_expert.shape[0] else None

    rows: list[dict[str, float]] = []
    for i, _layer in enumerate(snap.layers):
        row: dict[str, float] = {name: _f(values[i]) for name, values in interval.items()}
        row["receiver_skew"] = _f(receiver[i])
        row["sender_skew"] = _f(sender[i])
        local, intra, inter = (int(v) for v in snap.locality[i])
        total = local + intra + inter
        row.update(local_tokens=local, intra_node_tokens=intra, inter_node_tokens=inter,
                   inter_node_fraction=inter / total if total else math.nan)
        for name in STEP_SUMMARIZED:
            if per_step is None:
                row[f"{name}_step_mean"] = row[f"{name}_step_worst"] = math.nan
                continue
            summary = stats.summarize_steps(per_step[name][:, i], stats.worse_direction(name))
            row[f"{name}_step_mean"], row[f"{name}_step_worst"] = summary.mean, summary.worst
        if snap.dropped_per_expert is not None:
            dropped = int(snap.dropped_per_expert[i].sum())
            demand = dropped + int(counts[i].sum())
            row["dropped_tokens"] = dropped
            row["dropped_fraction"] = dropped / demand if demand else math.nan
        for phase, values in snap.timing_ms.items():
            row[f"{phase}_ms"] = _f(values[i])
        rows.append(row)

    all_meta = dict(snap.meta)
    if snap.dropped_per_source is not None:
        all_meta["dropped_per_source"] = snap.dropped_per_source.tolist()
    return IntervalReport(
        step=int(snap.step),
        steps=int(snap.steps),
        time=float(snap.time),
        layers=list(snap.layers),
        num_experts=int(snap.num_experts),
        ep_size=int(snap.ep_size),
        per_layer=rows,
        tokens_per_expert=counts.tolist(),
        rank_matrix=matrix.tolist(),
        dropped_per_expert=snap.dropped_per_expert.tolist() if snap.dropped_per_expert is not None else [],
        meta=all_meta,
    )
