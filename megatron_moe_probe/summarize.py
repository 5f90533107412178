"""Snapshot (tensors) -> IntervalReport (plain data): where the statistics are computed."""

from __future__ import annotations

import math

from megatron_moe_probe import stats
from megatron_moe_probe.accumulator import Snapshot
import numpy as np

from megatron_moe_probe.record import (LOCALITY_STATS, STEP_SUMMARIZED, IntervalReport, arrays_file_name,
                                       compact_int_array, step_summary_name, timing_stat)


def _f(x) -> float:
    return float(x)


def _router_health_rows(snap: Snapshot) -> dict[int, dict[str, float]]:
    """Router health's per-layer statistics (megatron/router_watch.py), moved from its block into
    the per-layer rows, where every per-layer statistic lives (the block keeps the per-expert
    arrays and the across-layer summary)."""
    block = (getattr(snap, "extras", None) or {}).get("router_health")
    if not block or "per_layer" not in block:
        return {}
    return dict(zip(block.pop("layers"), block.pop("per_layer")))


def build_report(snap: Snapshot, keep_iterations: bool = True) -> IntervalReport:
    """`keep_iterations`: put each iteration's counts (and matrices, when recorded) into the
    report's arrays, for the local writer's per-interval array file."""
    counts = snap.tokens_per_expert  # [L, E]
    interval = stats.layer_stats(counts, snap.ep_size)
    matrix = stats.rank_matrix_from_source_counts(snap.source_expert_counts, snap.ep_size)  # [L, EP, EP]
    receiver = stats.receiver_skew(matrix)
    sender = stats.sender_skew(matrix)
    per_step = stats.layer_stats(snap.step_tokens_per_expert, snap.ep_size) if snap.step_tokens_per_expert.shape[0] else None

    health = _router_health_rows(snap)
    rows: list[dict[str, float]] = []
    for i, _layer in enumerate(snap.layers):
        row: dict[str, float] = {name: _f(values[i]) for name, values in interval.items()}
        row["receiver_skew"] = _f(receiver[i])
        row["sender_skew"] = _f(sender[i])
        volumes = [int(v) for v in snap.locality[i]]  # stats.LOCAL, INTRA_NODE, INTER_NODE
        row.update(zip(LOCALITY_STATS, volumes))
        total, inter = sum(volumes), volumes[stats.INTER_NODE]
        row["inter_node_fraction"] = inter / total if total else math.nan
        for name in STEP_SUMMARIZED:
            mean_key, worst_key = step_summary_name(name, "step_mean"), step_summary_name(name, "step_worst")
            if per_step is None:
                row[mean_key] = row[worst_key] = math.nan
                continue
            summary = stats.summarize_steps(per_step[name][:, i], stats.worse_direction(name))
            row[mean_key], row[worst_key] = summary.mean, summary.worst
        if snap.dropped_per_expert is not None:
            dropped = int(snap.dropped_per_expert[i].sum())
            demand = dropped + int(counts[i].sum())
            row["dropped_tokens"] = dropped
            row["dropped_fraction"] = dropped / demand if demand else math.nan
        for phase, values in snap.timing_ms.items():
            row[timing_stat(phase)] = _f(values[i])
        row.update(health.get(_layer, {}))
        rows.append(row)

    arrays = {}
    history = snap.step_tokens_per_expert
    if keep_iterations and history.shape[0]:
        first = int(snap.step) - history.shape[0] + 1  # history holds the interval's last iterations
        arrays["iterations"] = np.arange(first, int(snap.step) + 1, dtype=np.int64)
        arrays["tokens_per_expert"] = compact_int_array(history.numpy())
        if snap.step_rank_matrix is not None:
            arrays["rank_matrix"] = compact_int_array(snap.step_rank_matrix.numpy())
    if snap.domain_tokens_per_expert is not None:
        arrays["domain_tokens_per_expert"] = compact_int_array(snap.domain_tokens_per_expert.numpy())
    if arrays:
        arrays["layers"] = np.asarray(snap.layers, dtype=np.int64)

    all_meta = dict(snap.meta)
    if snap.dropped_per_source is not None:
        all_meta["dropped_per_source"] = snap.dropped_per_source.tolist()
    if snap.extras:  # interval contributors' blocks (session.IntervalContributor), plain data
        all_meta["extras"] = dict(snap.extras)
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
        domains=list(snap.domains),
        arrays_file=arrays_file_name(snap.step) if arrays else "",
        arrays=arrays,
    )
