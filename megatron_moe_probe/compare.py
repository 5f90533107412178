"""`moe-probe compare RUN...`: runs side by side, from the local store and Megatron's log.

Each RUN is a probe run folder (the local writer's `intervals.jsonl` + `meta.json`).
If the folder holds `megatron.log` (or `--log RUN=FILE` names one), Megatron's own
numbers come from it (from `train.jsonl` for `moe-probe demo` runs): iteration time and TFLOP/s (medians over the intervals after
`--warmup`), the largest `max allocated` memory, and the last logged LM loss, with
its difference to the first run's (loss parity between dispatchers).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from megatron_moe_probe.errors import UsageError

TIMING = ("dispatch_fwd_ms", "combine_fwd_ms", "dispatch_bwd_ms", "combine_bwd_ms")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="probe run folders (intervals.jsonl)")
    p.add_argument("--log", action="append", default=[], metavar="RUN=FILE",
                   help="Megatron's stdout for a run (default: RUN/megatron.log when present)")
    p.add_argument("--warmup", type=int, default=10, help="ignore intervals ending at or before this iteration")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="also plot per-layer max/mean of every run")


def _median(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def training_log(run: Path, explicit: Path | None = None):
    """Megatron's numbers for a run: --log FILE, RUN/megatron.log, or the demo's RUN/train.jsonl."""
    from megatron_moe_probe.megatron.train_log import read_train_jsonl, read_train_log

    if explicit is not None:
        return read_train_log(explicit)
    if (run / "megatron.log").is_file():
        return read_train_log(run / "megatron.log")
    if (run / "train.jsonl").is_file():
        return read_train_jsonl(run / "train.jsonl")
    return None


def summarize_run(run: Path, log, warmup: int) -> dict:
    from megatron_moe_probe.writers.local import load_run

    meta, reports = load_run(run)
    kept = [r for r in reports if r.step > warmup] or reports
    if not kept:
        raise UsageError(f"{run}: no probe reports")
    row = {"run": str(run), "dispatcher": ",".join(meta.get("dispatcher") or []) if isinstance(
        meta.get("dispatcher"), list) else meta.get("dispatcher"), "ep": kept[-1].ep_size,
        "intervals": len(kept), "layers": kept[-1].layers}
    per_layer = list(zip(*[r.per_layer for r in kept]))  # layer -> its rows over intervals
    row["data"] = meta.get("data")
    for key in ("max_over_mean", "max_over_mean_step_worst", "gini", "rank_max_over_mean", "receiver_skew",
                "inter_node_fraction", *TIMING):
        row[key] = _median([_median([x.get(key, math.nan) for x in rows]) for rows in per_layer])
    row["max_over_mean_per_layer"] = [_median([x["max_over_mean"] for x in rows]) for rows in per_layer]
    if log is not None:
        after = [f for it, f in zip(log.iterations, log.fields) if it > warmup] or log.fields
        row["ms_per_iter"] = _median([f.get("elapsed time per iteration (ms)") for f in after])
        row["tflops_per_gpu"] = _median([f.get("throughput per GPU (TFLOP/s/GPU)") for f in after])
        row["max_allocated_mb"] = max(log.max_allocated_mb.values()) if log.max_allocated_mb else math.nan
        losses = log.series("lm loss")
        row["final_iteration"], row["final_lm_loss"] = losses[-1] if losses else (None, math.nan)
    return row


def compare(runs: list[Path], logs: dict[str, Path], warmup: int) -> list[dict]:
    rows = []
    for run in runs:
        if not run.is_dir():
            raise UsageError(f"not a run folder: {run}")
        rows.append(summarize_run(run, training_log(run, logs.get(str(run))), warmup))
    base = rows[0].get("final_lm_loss")
    for row in rows:
        loss = row.get("final_lm_loss")
        row["loss_delta_vs_first"] = (loss - base) if loss is not None and base is not None else math.nan
    return rows


def run(args: argparse.Namespace) -> int:
    logs = {}
    for item in args.log:
        run_dir, sep, file = item.partition("=")
        if not sep or not Path(file).is_file():
            raise UsageError(f"--log wants RUN=FILE with an existing file, got {item!r}")
        logs[str(Path(run_dir))] = Path(file)
    rows = compare([Path(r) for r in args.runs], logs, args.warmup)
    if args.json:
        json.dump(rows, sys.stdout, indent=1, default=str)
        print()
    else:
        print_table(rows)
    if args.plot:
        plot_runs(rows, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0


def _fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="runs compared (medians over intervals after warm-up)")
    columns = [("run", "run", "s"), ("dispatcher", "dispatcher", "s"), ("EP", "ep", "d"),
               ("ms/iter", "ms_per_iter", ".1f"), ("TFLOP/s/GPU", "tflops_per_gpu", ".1f"),
               ("max mem MB", "max_allocated_mb", ".0f"), ("final loss", "final_lm_loss", ".4f"),
               ("Δ loss", "loss_delta_vs_first", "+.4f"), ("max/mean", "max_over_mean", ".3f"),
               ("worst step", "max_over_mean_step_worst", ".3f"), ("gini", "gini", ".3f"),
               ("rank max/mean", "rank_max_over_mean", ".3f"), ("recv skew", "receiver_skew", ".3f"),
               ("dispatch fwd ms", "dispatch_fwd_ms", ".2f"), ("combine fwd ms", "combine_fwd_ms", ".2f")]
    # Columns no run has (CPU runs log no TFLOP/s or memory, runs without timing no dispatch ms) are left out.
    columns = [c for c in columns if c[1] in ("run", "dispatcher") or any(
        _fmt(row.get(c[1]), c[2]) != "-" for row in rows)]
    names = [Path(row["run"]).name for row in rows]
    for header, *_ in columns:
        if header == "run":
            table.add_column(header, no_wrap=True, min_width=max(map(len, names)))
        else:
            table.add_column(header, justify="left" if header == "dispatcher" else "right")
    for row in rows:
        shown = dict(row, run=Path(row["run"]).name)  # the folder name; --json keeps the path
        table.add_row(*[_fmt(shown.get(key), spec) for _, key, spec in columns])
    Console(width=max(Console().width, 160)).print(table)


def plot_runs(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for row in rows:
        ax.plot(row["layers"], row["max_over_mean_per_layer"], marker="o",
                label=f"{Path(row['run']).name} ({row['dispatcher']}, EP={row['ep']})")
    ax.set(xlabel="layer", ylabel="per-expert max/mean (median over intervals)", title="routing imbalance by run",
           xticks=sorted({n for row in rows for n in row["layers"]}))
    ax.legend()
    fig.savefig(path, dpi=110)
