"""`moe-probe demo`: a real tiny MoE training run on CPU with the probe on (cpu/demo.py trains;
this module reads the command line and prints the closing table and plot)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from megatron_moe_probe.commands import save_figure
from megatron_moe_probe.cpu import demo
from megatron_moe_probe.cpu.demo import DATA_SOURCES, DISPATCHERS, RANKS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=40, help="training iterations (default 40)")
    p.add_argument("--interval", type=int, default=10, help="iterations per probe report (default 10)")
    p.add_argument("--out", default=None, help="run folder (default runs/demo-<time>)")
    p.add_argument("--dispatcher", choices=DISPATCHERS, default="alltoall")
    p.add_argument("--ranks", type=int, default=2, choices=RANKS, help="processes = EP degree (default 2)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer, a multiple of --ranks (default 8)")
    p.add_argument("--data", choices=DATA_SOURCES, default="text",
                   help="text (stdlib source bytes, default), mock (Megatron's mock token stream), random bytes")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step over all ranks (default 4 per rank); fixed, it gives every EP "
                        "degree the same tokens each step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--quiet", action="store_true", help="no per-interval console table")
    p.add_argument("--writers", default=None,
                   help="comma list of local, tensorboard, wandb, console (default local, + console unless --quiet)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (only its files; without this flag the demo "
                        "refuses a folder that holds another run)")


def run(args: argparse.Namespace) -> int:
    from megatron_moe_probe.writers.base import parse_writer_names

    global_batch = 4 * args.ranks if args.global_batch is None else args.global_batch
    demo.check_settings(args.steps, args.interval, args.ranks, args.experts, global_batch, args.lr)
    writers = parse_writer_names(args.writers) if args.writers else None  # a typo: before anything starts
    out = demo.prepare_run_folder(Path(args.out) if args.out else None, overwrite=args.overwrite)

    from rich.console import Console

    console = Console()  # the terminal's width (80 in logs, or $COLUMNS): the tables fit it
    console.print(f"[bold]moe-probe demo[/]: Megatron GPTModel, 2 MoE layers x {args.experts} experts (top-2), "
                  f"{args.ranks} CPU ranks over gloo, EP={args.ranks}, {args.dispatcher} dispatcher, "
                  f"{args.data} data, {args.steps} steps -> {out}")
    t0 = time.perf_counter()
    from megatron_moe_probe.cpu.cluster import RankFailed

    try:
        results = demo.train(out, steps=args.steps, interval=args.interval, dispatcher=args.dispatcher,
                             ranks=args.ranks, experts=args.experts, data=args.data, global_batch=global_batch,
                             lr=args.lr, quiet=args.quiet, writers=writers)
    except RankFailed as exc:
        if os.environ.get("MOE_PROBE_TRACEBACK"):
            print(exc, file=sys.stderr)
        lines = [line for line in str(exc).splitlines() if line.strip()]
        print(f"moe-probe demo: error: {lines[0].rstrip(':')}: {lines[-1].strip()} "
              f"(MOE_PROBE_TRACEBACK=1 shows the traceback; records so far in {out})", file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    losses = results[0]["losses"]
    step_s = sorted(results[0]["step_seconds"])[len(losses) // 2]
    console.print(f"done in {wall:.1f} s (median step {step_s * 1000:.0f} ms); "
                  f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return final_report(out, console)


def final_report(out: Path, console) -> int:
    """Per-layer imbalance table over the whole run, read back from the local store, plus a plot."""
    from rich.table import Table

    from megatron_moe_probe.record import load_run

    meta, reports = load_run(out)
    if not reports:
        console.print("[red]no probe reports were written[/]")
        return 1
    from rich import box

    # One space between columns and two-line headers: it fits an 80-column terminal.
    table = Table(title=f"Routing imbalance per layer, {len(reports)} intervals to iteration {reports[-1].step}",
                  box=box.SIMPLE_HEAD, padding=0, title_justify="left")
    for col in ("layer", "tok×topk", "max/mean\nfirst→last", "worst\nstep", "gini", "entropy",
                "dead", "EP rank\nmax/mean", "sent to\nother rank"):
        table.add_column(col, justify="right", overflow="fold")
    for i, layer in enumerate(reports[-1].layers):
        first, last = reports[0].per_layer[i], reports[-1].per_layer[i]
        tokens = sum(r.per_layer[i]["tokens"] for r in reports)
        worst = max(r.per_layer[i]["max_over_mean_step_worst"] for r in reports)
        remote = last["intra_node_tokens"] + last["inter_node_tokens"]
        table.add_row(str(layer), f"{tokens:,.0f}", f"{first['max_over_mean']:.2f}→{last['max_over_mean']:.2f}",
                      f"{worst:.2f}", f"{last['gini']:.3f}", f"{last['entropy']:.3f}", f"{last['dead_experts']:.0f}",
                      f"{last['rank_max_over_mean']:.3f}", f"{remote / max(last['tokens'], 1):.0%}")
    console.print(table)
    from megatron_moe_probe.integrity_report import run_summary
    from megatron_moe_probe.writers.console import print_integrity

    print_integrity(console, run_summary(reports))
    try:
        plot = plot_run(out, reports)
    except OSError as exc:  # a full disk at the very end: the records are written, say so and go on
        console.print(f"[yellow]plot not written: {exc.strerror or exc}[/]")
        plot = None
    console.print(f"records: {out / 'intervals.jsonl'}" + (f"\nplot:    {plot}" if plot else ""))
    console.print(f"next:    {cli_command()} analyze {out}   (EP what-if, placement, all-to-all cost)")
    return 0


def cli_command() -> str:
    """How to call `moe-probe` from here: by name when PATH finds this environment's script
    (an activated venv), else by its path (`bash tools/bootstrap.sh demo` does not activate)."""
    import shutil

    script = Path(sys.executable).parent / "moe-probe"
    if not script.is_file():
        return f"{sys.executable} -m megatron_moe_probe.cli"
    if shutil.which("moe-probe") == str(script):
        return "moe-probe"
    return os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)


def plot_run(out: Path, reports) -> Path | None:
    """max/mean and Gini per layer over the run, and the last interval's per-expert load."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    steps = [r.step for r in reports]
    for i, layer in enumerate(reports[-1].layers):
        ax1.plot(steps, [r.per_layer[i]["max_over_mean"] for r in reports], marker="o", label=f"layer {layer}")
        ax2.plot(steps, [r.per_layer[i]["gini"] for r in reports], marker="o", label=f"layer {layer}")
    ax1.set(title="per-expert max/mean (interval)", xlabel="iteration")
    ax2.set(title="Gini of expert load", xlabel="iteration")
    ax1.legend()
    last = reports[-1]
    image = ax3.imshow(last.tokens_per_expert, aspect="auto", cmap="viridis")
    first = last.step - last.steps + 1  # the last record holds only its own interval
    ax3.set(title=f"tok×topk per expert, iterations {first}–{last.step}", xlabel="expert", ylabel="layer",
            yticks=range(len(last.layers)), yticklabels=[str(n) for n in last.layers])
    fig.colorbar(image, ax=ax3)
    path = out / demo.PLOT
    save_figure(fig, path)
    return path
