"""`moe-probe compare RUN...`: runs side by side (offline/compare.py), as a table, JSON or a plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_moe_probe.commands import output_file, print_json, save_figure
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
    p.add_argument("--warmup", type=int, default=10,
                   help="ignore intervals ending at or before this iteration (default 10); a run that ends "
                        "within the warm-up is taken whole, with a warning")
    p.add_argument("--wandb-timeout", type=int, default=30, metavar="S",
                   help="for wandb:... runs, seconds a request to the wandb server may take "
                        "(tried twice; default 30)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (strict: no NaN, null instead)")
    p.add_argument("--wide", action="store_true",
                   help="every column (worst step, rank max/mean, receiver skew, dispatch/combine ms); "
                        "the default table fits 80 columns")
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
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must be 0 or more")
    if args.wandb_timeout < 1:
        raise UsageError(f"--wandb-timeout {args.wandb_timeout}: must be at least 1 second")
    plot = output_file(args.plot, "--plot", ".png")  # checked before any run is read
    from megatron_moe_probe.megatron_dumps import load_run_or_dump

    rows = compare(args.runs, parse_log_options(args.log), args.warmup, args.wandb_timeout, load_run=load_run_or_dump)
    warn_about_warmup(rows)
    if args.json:
        print_json(rows)
    else:
        print_table(rows, wide=args.wide)
    if plot:
        plot_runs(rows, plot)
        print(f"plot: {plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def warn_about_warmup(rows: list[dict]) -> None:
    for row in rows:
        if row.get("warmup") and row.get("warmup_used") == 0:
            print(f"moe-probe compare: warning: {row['run']} ends at iteration {row.get('last_step')}, within "
                  f"--warmup {row['warmup']}; its medians are over all {row['intervals']} interval(s)",
                  file=sys.stderr)


# (header, row key, format); two-line headers keep the table inside 80 columns.
COLUMNS = [("run", "run", "s"), ("dispatcher", "dispatcher", "s"), ("ran", "ran", "s"), ("status", "status", "s"),
           ("EP", "ep", "d"), ("data", "data", "s"),
           ("ms/\niter", "ms_per_iter", ".1f"), ("TFLOP/s\n/GPU", "tflops_per_gpu", ".1f"),
           ("max mem\nMB", "max_allocated_mb", ".0f"), ("final\nloss", "final_lm_loss", ".4f"),
           ("Δ loss\nsame data", "loss_delta_vs_first", "+.4f"), ("max/\nmean", "max_over_mean", ".3f"),
           ("gini", "gini", ".3f")]
WIDE_COLUMNS = [("worst\nstep", "max_over_mean_step_worst", ".3f"), ("rank\nmax/mean", "rank_max_over_mean", ".3f"),
                ("recv\nskew", "receiver_skew", ".3f"), ("dispatch\nfwd ms", "dispatch_fwd_ms", ".2f"),
                ("combine\nfwd ms", "combine_fwd_ms", ".2f")]


def print_table(rows: list[dict], wide: bool = False, console=None) -> None:
    """The rows as a table at the terminal's width (80 in a log, never a fixed one); columns that
    do not fit go to a second table that repeats the run column."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from megatron_moe_probe.writers.console import column_chunks, print_integrity

    console = console or Console()
    columns = COLUMNS + (WIDE_COLUMNS if wide else [])
    # Columns no run has (CPU runs log no TFLOP/s or memory, runs without timing no dispatch ms) are left out.
    columns = [c for c in columns if c[1] in ("run", "dispatcher", "status") or any(
        _fmt(row.get(c[1]), c[2]) != "-" for row in rows)]
    # "ran" (the runtime proof) only where some run ran another backend than it asked for, and
    # "status" only where some run is not "ok": two runs of the demo fit 80 columns.
    if all(row.get("ran") in (None, row.get("dispatcher")) for row in rows):
        columns = [c for c in columns if c[1] != "ran"]
    if all(row.get("status") == "ok" for row in rows):
        columns = [c for c in columns if c[1] != "status"]
    headers = [header for header, *_ in columns]
    cells = [[_fmt(dict(row, run=Path(row["run"]).name).get(key), spec) for _, key, spec in columns]
             for row in rows]  # the folder name; --json keeps the path
    for part, chunk in enumerate(column_chunks(headers, cells, console.width)):
        table = Table(title="runs compared (medians over intervals after warm-up)" if part == 0 else None,
                      box=box.SIMPLE_HEAD, padding=0, pad_edge=False, title_justify="left")
        for j in (0, *chunk):
            left = headers[j] in ("run", "dispatcher", "ran", "status", "data")
            table.add_column(headers[j], justify="left" if left else "right", no_wrap=True)
        for row_cells in cells:
            table.add_row(*(row_cells[j] for j in (0, *chunk)))
        console.print(table)
    for row in rows:
        if row.get("status") == "environment limit":
            console.print(f"{Path(row['run']).name}: ENVIRONMENT LIMIT ({row['environment_limit']}): not performance "
                          "data, left out of the comparison")
        summary = row.get("integrity")
        if summary and summary["state"] != "clean":  # clean runs stay silent here
            print_integrity(console, summary, prefix=f"{Path(row['run']).name}: ")


LEGEND_KEYS = (("dispatcher", "{}"), ("ep", "EP={}"), ("data", "data={}"), ("ran", "ran {}"))


def legend_label(row: dict, rows: list[dict]) -> str:
    """The run's name, its dispatcher and EP, and every other key that differs between the runs."""
    parts = [fmt.format(row.get(key)) for key, fmt in LEGEND_KEYS
             if key in ("dispatcher", "ep") or len({str(r.get(key)) for r in rows}) > 1]
    return f"{Path(row['run']).name} ({', '.join(parts)})"


def plot_runs(rows: list[dict], path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9 if len(rows) > 4 else 7, 4), layout="constrained")
    ax = fig.subplots()
    colors = colormaps["tab20" if len(rows) > 10 else "tab10"].colors  # no colour twice up to 20 runs
    # Runs with the very same line (e.g. alltoall and allgather route alike) would hide each other:
    # each copy is drawn a little to the side, with its own marker, and the title says so.
    seen: dict[tuple, int] = {}
    copies = [0] * len(rows)
    for i, row in enumerate(rows):
        key = (tuple(row["layers"]), tuple(round(v, 6) for v in row["max_over_mean_per_layer"]))
        copies[i] = seen[key] = seen.get(key, -1) + 1
    markers = ("o", "s", "^", "D", "v", "P")
    for i, row in enumerate(rows):
        shift = 0.06 * copies[i]
        ax.plot([n + shift for n in row["layers"]], row["max_over_mean_per_layer"], marker=markers[copies[i] % 6],
                color=colors[i % len(colors)], linestyle=("-", "--", ":")[i // len(colors) % 3],
                label=legend_label(row, rows) + (" (same line, shifted)" if copies[i] else ""))
    title = "routing imbalance by run" + ("\n(identical lines drawn side by side)" if any(copies) else "")
    ax.set(xlabel="layer", ylabel="per-expert max/mean (median over intervals)", title=title,
           xticks=sorted({n for row in rows for n in row["layers"]}))
    if len(rows) > 4:
        fig.legend(loc="outside right upper", fontsize="small")  # beside the axes: no line hidden under it
    else:
        ax.legend()
    save_figure(fig, path)  # exactly `path`, whatever its name ends in
