"""One row of `moe-probe compare`'s table from any kind of run: the probe's statistics and
Megatron's own numbers, as medians over the intervals after the warm-up.

Every source (a local run folder, a wandb run) hands over the same shape, so they all
come out of `comparison_row` alike; this module knows no source.
"""

from __future__ import annotations

import math

from megatron_moe_probe import integrity_report
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record.names import COMPARE_STATS as STATS
from megatron_moe_probe.record.names import TIMING_STATS
from megatron_moe_probe.record.run_meta import backends_that_ran, requested_backend, settings_of
from megatron_moe_probe.values import nan_median


def run_dispatcher(meta: dict):
    """The probe meta's dispatcher as one string (a run may name several)."""
    dispatcher = meta.get("dispatcher")
    return ",".join(dispatcher) if isinstance(dispatcher, list) else dispatcher


def run_data(meta: dict):
    """What a run trained on, for the data column and loss parity: the probe meta's `data` (the
    demo's text/mock/random), else Megatron's --mock-data or --data-path (folder names), else None
    (the run's typed settings, record/run_meta.py)."""
    if meta.get("data") is not None:
        return meta["data"]
    return settings_of(meta)[0].data


def comparison_row(run: str, identity: dict, intervals: list[tuple[int, dict[int, dict]]], log, warmup: int) -> dict:
    """One row of the table. identity: dispatcher, ep, data; intervals: (step, layer -> that
    layer's statistics) per probe report; log: Megatron's numbers (a TrainLog) or None."""
    kept = [by_layer for step, by_layer in intervals if step > warmup]
    warmup_used = warmup
    if not kept:  # the run ends within the warm-up: all of it, and the row says so (`warmup_used` 0)
        kept, warmup_used = [by_layer for _, by_layer in intervals], 0
    if not kept:
        raise UsageError(f"{run}: no probe reports")
    layers = sorted({n for by_layer in kept for n in by_layer})
    series = {n: [by_layer[n] for by_layer in kept if n in by_layer] for n in layers}
    per_layer = {key: [nan_median([x.get(key, math.nan) for x in series[n]]) for n in layers] for key in STATS}
    row = {"run": run, **identity, "intervals": len(kept), "warmup": warmup, "warmup_used": warmup_used,
           "last_step": max((step for step, _ in intervals), default=None), "layers": layers}
    row.update({key: nan_median(values) for key, values in per_layer.items()})
    row["max_over_mean_per_layer"] = per_layer["max_over_mean"]
    if log is not None:
        after = [f for it, f in zip(log.iterations, log.fields) if it > warmup] or log.fields
        row["ms_per_iter"] = nan_median([f.get("elapsed time per iteration (ms)") for f in after])
        row["tflops_per_gpu"] = nan_median([f.get("throughput per GPU (TFLOP/s/GPU)") for f in after])
        row["max_allocated_mb"] = max(log.max_allocated_mb.values()) if log.max_allocated_mb else math.nan
        losses = log.series("lm loss")
        row["final_iteration"], row["final_lm_loss"] = losses[-1] if losses else (None, math.nan)
    return row


PERFORMANCE = ("ms_per_iter", "tflops_per_gpu", "max_allocated_mb", "final_lm_loss", *TIMING_STATS)


def runtime_check(meta: dict, reports: list) -> dict:
    """Requested backend (meta.json) against what the live layers ran (the probe's
    `runtime_dispatchers`, last report): {'requested', 'ran', 'runtime_proof', 'environment_limit'}."""
    requested = requested_backend(meta)
    records = next((r.meta.get("runtime_dispatchers") for r in reversed(reports) if r.meta.get("runtime_dispatchers")), None)
    if not records:
        return {"requested": requested, "ran": None, "runtime_proof": "none recorded", "environment_limit": None}
    ran = backends_that_ran(records)
    limit = None
    if requested is not None and ran != [requested]:
        limit = f"requested {requested}, ran {','.join(ran)}"
    return {"requested": requested, "ran": ",".join(ran), "runtime_proof": "live modules",
            "environment_limit": limit, "runtime_dispatchers": records}


def mark_environment_limit(row: dict, reason: str) -> dict:
    """A run whose requested backend did not run is an environment limit, never performance data:
    its performance numbers move out of the comparison (kept under `not_performance_data`)."""
    row["status"] = "environment limit"
    row["environment_limit"] = reason
    row["not_performance_data"] = {k: row[k] for k in PERFORMANCE if k in row}
    for k in PERFORMANCE:
        if k in row:
            row[k] = math.nan
    return row


def with_runtime_proof(row: dict, meta: dict, reports: list) -> dict:
    """The row with what ran against what was requested; an environment limit when they differ.
    Every source of rows (run folders, wandb runs) goes through here, so their rows agree."""
    check = runtime_check(meta, reports)
    row.update({k: v for k, v in check.items() if k != "environment_limit"})
    row["status"] = "ok"
    if check["environment_limit"]:
        mark_environment_limit(row, check["environment_limit"])
    # The exchange itself: a run whose dispatcher lost or misrouted rows is not comparable.
    row["integrity"] = integrity_report.run_summary(reports)
    if row["integrity"] and row["integrity"]["state"] == "violated" and row["status"] == "ok":
        row["status"] = "integrity violation"
    return row
