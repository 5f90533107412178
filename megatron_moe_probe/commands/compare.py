"""`moe-probe compare RUN...`: runs side by side (offline/compare.py), as a table, JSON or a plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.offline.compare import compare
from megatron_moe_probe.values import format_or_dash as _fmt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a probe run folder (intervals.jsonl), a wandb run folder (OUT/wandb/offline-run-*, "
                        "read offline) or wandb:ENTITY/PROJECT/RUN_ID (read through the wandb API)")
    p.add_argument("--log", action="append", default=[], metavar="RUN=FILE",
                   help="Megatron's stdout for a run (default: RUN/megatron.log when present; "
                        "for a wandb run, Megatron's wandb keys)")
    p.add_argument("--warmup", type=int, default=10, help="ignore intervals ending at or before this iteration")
    p.add_argument("--wandb-timeout", type=int, default=30, metavar="S",
                   help="for wandb:... runs, seconds a request to the wandb server may take "
                        "(tried twice; default 30)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="also plot per-layer max/mean of every run")


def parse_log_options(items: list[str]) -> dict[str, Path]:
    """`--log RUN=FILE` options -> {run folder: Megatron's log file}."""
    logs = {}
    for item in items:
        run_dir, sep, file = item.partition("=")
        if not sep or not Path(file).is_file():
            raise UsageError(f"--log wants RUN=FILE with an existing file, got {item!r}")
        logs[str(Path(run_dir))] = Path(file)
    return logs


def run(args: argparse.Namespace) -> int:
    rows = compare(args.runs, parse_log_options(args.log), args.warmup, args.wandb_timeout)
    if args.json:
        json.dump(rows, sys.stdout, indent=1, default=str)
        print()
    else:
        print_table(rows)
    if args.plot:
        plot_runs(rows, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="runs compared (medians over intervals after warm-up)")
    columns = [("run", "run", "s"), ("dispatcher", "dispatcher", "s"), ("ran", "ran", "s"), ("status", "status", "s"),
               ("EP", "ep", "d"),
               ("ms/iter", "ms_per_iter", ".1f"), ("TFLOP/s/GPU", "tflops_per_gpu", ".1f"),
               ("max mem MB", "max_allocated_mb", ".0f"), ("final loss", "final_lm_loss", ".4f"),
               ("Δ loss", "loss_delta_vs_first", "+.4f"), ("max/mean", "max_over_mean", ".3f"),
               ("worst step", "max_over_mean_step_worst", ".3f"), ("gini", "gini", ".3f"),
               ("rank max/mean", "rank_max_over_mean", ".3f"), ("recv skew", "receiver_skew", ".3f"),
               ("dispatch fwd ms", "dispatch_fwd_ms", ".2f"), ("combine fwd ms", "combine_fwd_ms", ".2f")]
    # Columns no run has (CPU runs log no TFLOP/s or memory, runs without timing no dispatch ms) are left out.
    columns = [c for c in columns if c[1] in ("run", "dispatcher", "status") or any(
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
    console = Console(width=max(Console().width, 160))
    console.print(table)
    for row in rows:
        if row.get("status") == "environment limit":
            console.print(f"{Path(row['run']).name}: ENVIRONMENT LIMIT ({row['environment_limit']}): not performance "
                          "data, left out of the comparison")


def plot_runs(rows: list[dict], path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9 if len(rows) > 4 else 7, 4), layout="constrained")
    ax = fig.subplots()
    colors = colormaps["tab20" if len(rows) > 10 else "tab10"].colors  # no colour twice up to 20 runs
    for i, row in enumerate(rows):
        ax.plot(row["layers"], row["max_over_mean_per_layer"], marker="o", color=colors[i % len(colors)],
                linestyle=("-", "--", ":")[i // len(colors) % 3],
                label=f"{Path(row['run']).name} ({row['dispatcher']}, EP={row['ep']})")
    ax.set(xlabel="layer", ylabel="per-expert max/mean (median over intervals)", title="routing imbalance by run",
           xticks=sorted({n for row in rows for n in row["layers"]}))
    if len(rows) > 4:
        fig.legend(loc="outside right upper", fontsize="small")  # beside the axes: no line hidden under it
    else:
        ax.legend()
    fig.savefig(path, dpi=110)
