"""`moe-probe matrix`: train a grid of runs one after another (offline/matrix.py), then compare them."""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
from pathlib import Path

from megatron_moe_probe.commands import args_after_dashdash, save_figure
from megatron_moe_probe.commands.compare import plot_runs, print_table
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.offline import matrix
from megatron_moe_probe.offline.matrix import MANIFEST, Cell, Stopped


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = ("moe-probe matrix RECIPE[:VARIANT]... [--dispatcher BACKENDS] [--assume-installed LIST] "
               "[--data recipe,PREFIX] [--iters N] [--node-rank R --master-addr HOST] [--sbatch DIR] --out DIR "
               "[-- MEGATRON ARGS]\n"
               "       moe-probe matrix --demo [--ep 2,4,8] [--dispatcher alltoall,allgather] [--data text,mock,random] "
               "--out DIR")
    p.add_argument("targets", nargs="*", help="recipes (NAME or NAME:VARIANT) to train with `moe-probe train`")
    p.add_argument("--demo", action="store_true", help="CPU grid with `moe-probe demo` instead of recipes")
    p.add_argument("--ep", default="2,4", help="--demo: EP degrees (processes), from 2, 4, 8 (default 2,4)")
    p.add_argument("--dispatcher", default=None,
                   help="comma list. --demo: alltoall, allgather (default both). Recipes: backends to force in every "
                        "recipe, one cell each (alltoall, allgather, deepep, hybridep, ncclep; default: the recipe's own): "
                        "the matched A/B that `moe-probe recommend` prints")
    p.add_argument("--assume-installed", default=None, metavar="LIST",
                   help="recipes: passed to every `moe-probe train` cell (and used by --dry-run to validate the cells)")
    p.add_argument("--data", default=None,
                   help="comma list. Recipes: `recipe` (the recipe's own data, default) or indexed dataset "
                        "prefixes. --demo: text, mock, random (default text)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="--demo: sequences per step over all ranks, the same at every EP (default 4 per rank)")
    p.add_argument("--iters", type=int, default=None, help="iterations per cell (default: recipe's / demo's 40)")
    p.add_argument("--repeat", type=int, default=1, help="identical runs per cell, for the noise floor (default 1)")
    p.add_argument("--out", required=True, help="matrix folder: one sub-folder per cell, matrix.json, compare.*")
    p.add_argument("--warmup", type=int, default=None,
                   help="compare: skip intervals up to this iteration (default: a quarter of --iters)")
    p.add_argument("--cell-timeout", type=float, default=None, metavar="S", help="stop a cell after S seconds")
    p.add_argument("--rerun", action="store_true", help="train cells again even when matrix.json says they finished")
    p.add_argument("--node-rank", type=int, default=None,
                   help="recipes on several nodes: this node's rank (run the same matrix command on every node)")
    p.add_argument("--master-addr", default=None, help="recipes on several nodes: node 0's address")
    p.add_argument("--master-port", type=int, default=None, help="recipes on several nodes: node 0's port (default 29500)")
    p.add_argument("--sbatch", default=None, metavar="DIR",
                   help="write one Slurm batch script per cell into DIR (srun, one task per GPU) and exit; trains nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="validate every cell (recipe, dispatcher, availability gate, rendered args) and print its "
                        "command; trains nothing")
    p.add_argument("--wandb", action="store_true",
                   help="also log every cell to wandb, all in one group (offline unless $WANDB_MODE says)")
    p.add_argument("--group", default=None,
                   help="--wandb: the wandb group (default: the --out folder's name)")
    p.parse_args = args_after_dashdash(p.parse_args)


def _csv(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"{what}: empty list")
    return items


def cells_from(args: argparse.Namespace, out: Path) -> list[Cell]:
    if args.demo:
        from megatron_moe_probe.cpu.demo import DISPATCHERS

        try:
            eps = [int(x) for x in _csv(args.ep, "--ep")]
        except ValueError:
            raise UsageError(f"--ep wants integers, got {args.ep!r}") from None
        dispatchers = _csv(args.dispatcher or ",".join(DISPATCHERS), "--dispatcher")
        return matrix.demo_cells(out, eps, dispatchers, _csv(args.data or "text", "--data"),
                                 args.iters, args.global_batch, args.repeat)
    if args.targets and args.global_batch is not None:
        raise UsageError("--global-batch is for --demo cells; for recipes pass Megatron's: -- --global-batch-size N")
    return matrix.recipe_cells(out, args.targets, _csv(args.data or "recipe", "--data"), args.iters, args.repeat,
                               args.megatron_args,
                               dispatchers=_csv(args.dispatcher, "--dispatcher") if args.dispatcher else None,
                               assume_installed=args.assume_installed, node_rank=args.node_rank,
                               master_addr=args.master_addr, master_port=args.master_port,
                               per_node_rendezvous=not args.sbatch)


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1 or (args.iters is not None and args.iters < 1):
        raise UsageError("--repeat and --iters must be at least 1")
    if args.demo and args.targets:
        raise UsageError("give recipes or --demo, not both")
    if args.demo and args.megatron_args:
        raise UsageError("Megatron args after -- are for recipe cells; --demo takes none")
    if args.cell_timeout is not None and not args.cell_timeout > 0:
        raise UsageError(f"--cell-timeout {args.cell_timeout:g}: must be a positive number of seconds")
    if args.warmup is not None and args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must be 0 or more")
    out = Path(args.out)
    cells = cells_from(args, out)
    if args.demo and args.assume_installed is not None:
        raise UsageError("--assume-installed is for recipe cells; --demo runs alltoall/allgather on CPU")
    if not args.demo and cells:
        # The Megatron args every cell appends (yours after --, the probe's): Megatron's parser
        # checks them once now, not each cell after the one before it trained.
        from megatron_moe_probe.megatron.flags import check_megatron_args

        command = cells[0].command
        check_megatron_args(command[command.index("--") + 1:] if "--" in command else [])
    if args.wandb:
        matrix.to_wandb(cells, args.group or out.resolve().name, demo=args.demo)
    if args.demo and (args.node_rank is not None or args.master_addr or args.sbatch):
        raise UsageError("--node-rank, --master-addr and --sbatch are for recipe cells; --demo runs on this machine")
    if args.sbatch:
        return write_sbatch(cells, out, Path(args.sbatch), args)
    if args.dry_run:
        from megatron_moe_probe.torchrun import shell_join

        checked = [] if args.demo else matrix.validate_recipe_cells(cells, args.assume_installed)
        multi = any(_placeholders(c) for c in cells)
        if multi:
            print("# multi-node: run these commands on every node with NODE_RANK (0, 1, ...) and MASTER_ADDR "
                  "(node 0's address) set, or write Slurm scripts with --sbatch DIR")
        for i, cell in enumerate(cells):
            print(f"# {cell.name}")
            if checked:
                print(checked[i])
            print(f"{shell_join(cell.command)} > {out / cell.name / cell.log_name} 2>&1")
        print(f"## dry run: {len(cells)} cell(s) " + ("listed" if args.demo else "validated") + ", nothing trained")
        return 0
    if waiting := [c.name for c in cells if _placeholders(c)]:
        raise UsageError(f"cell {waiting[0]} spans several nodes: give --node-rank and --master-addr (and run the same "
                         "matrix command on every node), or --sbatch DIR for Slurm; --dry-run prints the commands")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc.strerror or exc}") from None
    from megatron_moe_probe.record import lock_run_folder, release_lock

    # Several nodes run the same matrix command: node 0 owns OUT (lock, check, manifest); the other
    # nodes only launch their part of each cell.
    lead = args.node_rank in (None, 0)
    try:
        if lead:
            lock_run_folder(out)  # one matrix per folder at a time, taken before the check it guards
            matrix.check_out_folder(out, cells)
    except BaseException:
        release_lock(out)
        if created:
            out.rmdir()
        raise

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()  # the terminal's width, 80 in a log (or $COLUMNS)
    argv = sys.argv[1:]

    def save() -> None:  # matrix.json is node 0's
        if lead:
            matrix.save_manifest(out, cells, argv)

    todo = matrix.mark_finished(cells, out, args.rerun)
    if len(todo) < len(cells):
        console.print(f"{len(cells) - len(todo)} of {len(cells)} cells already finished in {out / MANIFEST}; "
                      f"training {len(todo)} (--rerun trains all)")
    save()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("matrix", total=len(todo))
        matrix.stop_on_signals()
        for i, cell in enumerate(todo, 1):
            progress.update(task, description=f"training {cell.name}")
            try:
                matrix.run_cell(cell, out, args.cell_timeout, started=save)
            except (KeyboardInterrupt, Stopped) as exc:
                save()
                console.print(f"[yellow]interrupted in {cell.name}; run the same command again to resume[/]")
                return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)
            save()
            mark = "[green]ok[/]" if cell.status == "ok" else f"[red]{cell.status}[/] (exit {cell.exit_code})"
            progress.console.print(f"[{i}/{len(todo)}] {cell.name}: {mark} in {cell.seconds:.0f} s")
            progress.advance(task)
    return print_summary(cells, out, args, console)


def _placeholders(cell: Cell) -> list[str]:
    from megatron_moe_probe.torchrun import is_placeholder

    return [w for w in cell.command if is_placeholder(w)]


def write_sbatch(cells: list[Cell], out: Path, folder: Path, args: argparse.Namespace) -> int:
    """One batch script per recipe cell (validated first, as --dry-run does) and a list of
    `sbatch` lines to submit them one after another; nothing trains."""
    from megatron_moe_probe import recipes, sbatch
    from megatron_moe_probe.record import atomic_write_text

    checked = matrix.validate_recipe_cells(cells, args.assume_installed)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--sbatch {folder}: {exc.strerror or exc}") from None
    submit = ["#!/bin/bash", "# submit the A/B cells one after another (each waits for the one before)",
              "set -euo pipefail", "prev="]
    for cell, line in zip(cells, checked):
        par = recipes.load_recipe(cell.params["recipe"]).parallelism
        path = folder / f"{cell.name}.sbatch"
        atomic_write_text(path, sbatch.cell_script(cell, par.nodes, par.gpus_per_node, folder / f"{cell.name}-%j.log",
                                                   master_port=args.master_port or 29500))
        print(f"# {cell.name}: {line.removeprefix('## ')}")
        print(f"wrote {path}")
        submit.append(f'prev=$(sbatch --parsable ${{prev:+--dependency=afterany:$prev}} {path})')
    atomic_write_text(folder / "submit.sh", "\n".join(submit) + "\n")
    print(f"## {len(cells)} batch script(s) in {folder}; submit them in order with: bash {folder / 'submit.sh'}; "
          f"each cell records into {out}/CELL; compare them afterwards with moe-probe compare")
    return 0


def print_summary(cells: list[Cell], out: Path, args: argparse.Namespace, console) -> int:
    failed = [c for c in cells if c.status != "ok"]
    matrix.mark_environment_limits(cells, out)
    for cell in failed:
        limit = cell.extra.get("environment_limit")
        if limit:
            console.print(f"[yellow]{cell.name}: ENVIRONMENT LIMIT[/] ({limit}): the requested backend did not run; "
                          "not performance data")
            continue
        reason = cell.extra.get("reason", f"exit code {cell.exit_code}")
        console.print(f"[red]{cell.name} failed[/] ({reason}); end of {out / cell.name / cell.log_name}:\n"
                      f"{matrix.log_tail(out / cell.name / cell.log_name)}")
    done = [c for c in cells if c.status == "ok"]
    if not done:
        console.print("[red]no cell finished[/]")
        return 1
    warmup = args.warmup if args.warmup is not None else (args.iters or 40) // 4
    rows, spread = matrix.compare_cells(cells, out, warmup)
    print_table(rows)
    if spread:
        _print_spread(spread, console)
    plot_runs(rows, out / "layers.png")
    plot_matrix(rows, out / "compare.png")
    console.print(f"matrix: {len(done)} of {len(cells)} cells finished; {out / 'compare.json'}, "
                  f"{out / 'compare.png'} (per cell), {out / 'layers.png'} (per layer)")
    return 1 if failed else 0


PANELS = (("ms_per_iter", "ms / iteration"), ("max_over_mean", "per-expert max/mean"), ("gini", "Gini"),
          ("receiver_skew", "receiver skew"))


def plot_matrix(rows: list[dict], path: Path) -> None:
    """One bar per group of identical cells (median), with the repeats' min-max as the error
    bar, for step time and the routing statistics: the noise floor is drawn next to the
    differences it has to be compared with."""
    from matplotlib.figure import Figure

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    panels = [(key, label) for key, label in PANELS
              if any(not math.isnan(r.get(key, math.nan)) for r in rows)]
    cols = 2 if len(groups) > 4 and len(panels) > 2 else len(panels)  # wide grids: a 2 x 2 page
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(max(6.0, 0.55 * len(groups) * cols), 4.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    x = range(len(groups))
    for ax, (key, label) in zip(axes, panels):
        values = [[r[key] for r in g if not math.isnan(r.get(key, math.nan))] for g in groups.values()]
        mid = [statistics.median(v) if v else math.nan for v in values]
        low = [m - min(v) if v else 0 for m, v in zip(mid, values)]
        high = [max(v) - m if v else 0 for m, v in zip(mid, values)]
        ratio = key in ("max_over_mean", "receiver_skew")
        # Ratios are >= 1 (1.0 = balanced): their bars start at 1.0, where a 1.0 vs 1.3 difference
        # is visible (from 0 it is a few percent of the bar); value labels show a bar of no height.
        base = 1.0 if ratio else 0.0
        bars = ax.bar(x, [m - base for m in mid], bottom=base, yerr=[low, high], capsize=3, color="tab:blue", alpha=0.8)
        ax.bar_label(bars, labels=[f"{m:.3g}" for m in mid], fontsize="x-small", padding=2)
        ax.set_title(label + (" (axis from 1.0 = balanced)" if ratio else ""), fontsize="medium")
        ax.set_ylabel(label, fontsize="small")
        ax.set_xticks(list(x), list(groups), rotation=60, ha="right", fontsize="small")
        finite = [m + h for m, h in zip(mid, high) if m == m]
        ax.set_ylim(base, max([base + 0.05, *finite]) * 1.08 if ratio else None)
        if ratio:
            ax.axhline(1.0, color="black", linewidth=0.8)
    fig.suptitle("matrix: median per cell, bars = min-max over repeats")
    save_figure(fig, path)


def _print_spread(spread: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="step time between identical runs (the noise floor)")
    for col in ("cells", "runs", "median ms/iter", "(max-min)/median"):
        table.add_column(col, justify="left" if col == "cells" else "right")
    for s in spread:
        table.add_row(s["group"], str(s["runs"]), f"{s['median_ms_per_iter']:.1f}", f"{s['spread']:.1%}")
    console.print(table)
