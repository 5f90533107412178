"""`moe-probe matrix`: train a grid of runs one after another, then compare them.

GPU (Megatron pretraining through `moe-probe train`), targets are recipes:
    moe-probe matrix tiny-gpu:ep4 tiny-gpu:ep4-allgather --data recipe,/data/textds \\
        --iters 100 --repeat 2 --out runs/m1 [-- extra Megatron args for every cell]
CPU (`moe-probe demo`: real Megatron MoE layers over gloo), the grid is EP x dispatcher x data:
    moe-probe matrix --demo --ep 2,4,8 --dispatcher alltoall,allgather --data text,mock --out runs/m2

Each cell trains in its own process group into OUT/<cell>/ (the probe's local store and
the training's own log). Its outcome goes to OUT/matrix.json the moment it ends, so an
interrupted matrix resumes where it stopped: finished cells are skipped unless --rerun.
A failed cell does not stop the others; the summary names it with the end of its log and
the exit code is 1. Then `moe-probe compare` over the finished cells (table,
OUT/compare.json, OUT/compare.png) and, with --repeat, the spread of step time between
identical runs: the noise floor that a difference between dispatchers has to beat.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_moe_probe.errors import UsageError

MANIFEST = "matrix.json"
CLI = [sys.executable, "-m", "megatron_moe_probe.cli"]


@dataclass
class Cell:
    name: str
    group: str  # the cell's name without its repeat number: identical runs share it
    params: dict
    command: list[str]
    log_name: str  # the training's stdout+stderr, inside the cell folder
    status: str = "pending"  # pending | running | ok | failed | interrupted
    exit_code: int | None = None
    seconds: float | None = None
    extra: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # set for the cell's process: the wandb group and its keys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = ("moe-probe matrix RECIPE[:VARIANT]... [--data recipe,PREFIX] [--iters N] --out DIR [-- MEGATRON ARGS]\n"
               "       moe-probe matrix --demo [--ep 2,4,8] [--dispatcher alltoall,allgather] [--data text,mock,random] "
               "--out DIR")
    p.add_argument("targets", nargs="*", help="recipes (NAME or NAME:VARIANT) to train with `moe-probe train`")
    p.add_argument("--demo", action="store_true", help="CPU grid with `moe-probe demo` instead of recipes")
    p.add_argument("--ep", default="2,4", help="--demo: EP degrees (processes), from 2, 4, 8 (default 2,4)")
    p.add_argument("--dispatcher", default="alltoall,allgather", help="--demo: dispatchers (default both)")
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
    p.add_argument("--dry-run", action="store_true", help="print each cell's command and exit")
    p.add_argument("--wandb", action="store_true",
                   help="also log every cell to wandb, all in one group (offline unless $WANDB_MODE says)")
    p.add_argument("--group", default=None,
                   help="--wandb: the wandb group (default: the --out folder's name)")
    from megatron_moe_probe.cli import args_after_dashdash

    p.parse_args = args_after_dashdash(p.parse_args)


def _csv(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"{what}: empty list")
    return items


def demo_cells(args: argparse.Namespace, out: Path) -> list[Cell]:
    from megatron_moe_probe.demo import DATA_SOURCES, DISPATCHERS, RANKS

    try:
        eps = [int(x) for x in _csv(args.ep, "--ep")]
    except ValueError:
        raise UsageError(f"--ep wants integers, got {args.ep!r}") from None
    if bad := [e for e in eps if e not in RANKS]:
        choices = f"{', '.join(map(str, RANKS[:-1]))} or {RANKS[-1]}"
        raise UsageError(f"--demo runs EP {choices} (one process per EP rank), not {bad}")
    dispatchers = _csv(args.dispatcher, "--dispatcher")
    if bad := [d for d in dispatchers if d not in DISPATCHERS]:
        raise UsageError(f"--demo dispatchers are {' and '.join(DISPATCHERS)}, not {bad}")
    data = _csv(args.data or "text", "--data")
    if bad := [d for d in data if d not in DATA_SOURCES]:
        raise UsageError(f"--demo data is one of {', '.join(DATA_SOURCES)}, not {bad}")
    if args.global_batch is not None and (args.global_batch < 1 or any(args.global_batch % ep for ep in eps)):
        raise UsageError(f"--global-batch {args.global_batch} must be a multiple of every EP in {eps}")
    experts = max(8, *eps)  # the same model in every cell, whatever its EP
    grid = []
    for ep, dispatcher, source in itertools.product(eps, dispatchers, data):
        cmd = [*CLI, "demo", "--ranks", str(ep), "--dispatcher", dispatcher, "--data", source,
               "--experts", str(experts), "--steps", str(args.iters or 40), "--quiet",
               *(["--global-batch", str(args.global_batch)] if args.global_batch else []), "--out"]
        grid.append((f"ep{ep}-{dispatcher}-{source}", {"ep": ep, "dispatcher": dispatcher, "data": source,
                                                       "experts": experts, "global_batch": args.global_batch},
                     cmd, []))
    return _with_repeats(grid, args.repeat, out, "demo.log")


def recipe_cells(args: argparse.Namespace, out: Path) -> list[Cell]:
    from megatron_moe_probe import recipes
    from megatron_moe_probe.megatron.data import require_dataset

    if not args.targets:
        raise UsageError("name recipes to train (moe-probe render --list), or give --demo")
    if args.global_batch is not None:
        raise UsageError("--global-batch is for --demo cells; for recipes pass Megatron's: -- --global-batch-size N")
    # Loading each recipe now makes a typo fail before an hour of other cells, not after.
    ep_of = {target: recipes.load_recipe(target).parallelism.ep for target in args.targets}
    data = _csv(args.data or "recipe", "--data")
    for prefix in data:
        if prefix != "recipe":
            require_dataset(prefix, "--data", "`recipe` means the recipe's own data")
    grid = []
    for target, prefix in itertools.product(args.targets, data):
        name = target.replace(":", "-").replace("/", "_") + ("" if prefix == "recipe" else f"-{Path(prefix).name}")
        cmd = [*CLI, "train", target, *([] if prefix == "recipe" else ["--data-path", prefix]), "--",
               *(["--train-iters", str(args.iters)] if args.iters else []),
               "--moe-probe", "--moe-probe-writers", "local", "--moe-probe-dir"]
        grid.append((name, {"recipe": target, "ep": ep_of[target], "data": prefix}, cmd, args.megatron_args))
    return _with_repeats(grid, args.repeat, out, "megatron.log")


def _with_repeats(grid: list[tuple[str, dict, list[str], list[str]]], repeat: int, out: Path,
                  log_name: str) -> list[Cell]:
    """Cells of (group name, params, command up to its output-folder flag, command tail). Repeats go
    round the whole grid, so slow drift of the machine hits every group alike."""
    cells = []
    for k in range(1, repeat + 1):
        for group, params, head, tail in grid:
            name = group if repeat == 1 else f"{group}-r{k}"
            cells.append(Cell(name, group, params, [*head, str(out / name), *tail], log_name))
    return cells


def _to_wandb(cells: list[Cell], group: str, demo: bool) -> None:
    """Every cell also writes to wandb, into one group; its grid parameters become the grouping
    keys (`moe_probe.group` in the run's config, grouping.py). The wandb variables are wandb's own,
    so Megatron's own wandb run (GPU cells with --wandb-project) is grouped the same way."""
    from megatron_moe_probe.grouping import GROUP_ENV, KEYS_ENV

    flag = "--writers" if demo else "--moe-probe-writers"
    for cell in cells:
        i = cell.command.index(flag) if flag in cell.command else None
        if i is None:  # the demo's command has no --writers yet
            cell.command[-2:-2] = [flag, "local,wandb"]
        else:
            cell.command[i + 1] = "local,wandb"
        keys = {k: v for k, v in cell.params.items() if k in ("dispatcher", "ep", "data", "recipe")}
        cell.env = {GROUP_ENV: group, KEYS_ENV: json.dumps({"group": group, **keys}), "WANDB_NAME": cell.name,
                    "WANDB_JOB_TYPE": cell.group}


# -- running --------------------------------------------------------------------------------------

def _load_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UsageError(f"{path} is not valid JSON; move it away to start this matrix afresh") from None


def _save_manifest(out: Path, cells: list[Cell], argv: list[str]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"argv": argv, "cells": [asdict(c) for c in cells]}, indent=1))
    os.replace(tmp, out / MANIFEST)  # never half a manifest, even when killed mid-write


class Stopped(Exception):
    """The matrix itself got SIGTERM or SIGHUP (a scheduler, a closed terminal): stop the running
    cell with everything it started, record it, and exit, instead of leaving it orphaned."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def run_cell(cell: Cell, out: Path, timeout: float | None, started=lambda: None) -> None:
    """Train one cell in a fresh folder, in its own session, so that a timeout or a stop takes
    torchrun's workers (or the demo's ranks) down with it. `started()` runs once it is running."""
    cell_dir = out / cell.name
    if cell_dir.exists():
        shutil.rmtree(cell_dir)  # a stale attempt would mix its reports into this one
    cell_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(cell_dir / cell.log_name, "wb") as log:
        proc = subprocess.Popen(cell.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **cell.env} if cell.env else None)
        cell.extra["pid"] = proc.pid  # also the cell's process group and session id
        cell.status = "running"
        try:
            started()
            cell.exit_code = proc.wait(timeout=timeout)
            cell.status = "ok" if cell.exit_code == 0 else "failed"
        except subprocess.TimeoutExpired:
            stop_group(proc)
            cell.exit_code = proc.returncode
            cell.status, cell.extra["reason"] = "failed", f"stopped after --cell-timeout {timeout:g} s"
        except (KeyboardInterrupt, Stopped):
            stop_group(proc)
            cell.status = "interrupted"
            raise
        finally:
            cell.seconds = round(time.perf_counter() - t0, 1)
    if cell.status == "ok" and not (cell_dir / "intervals.jsonl").is_file():
        cell.status, cell.extra["reason"] = "failed", "exited 0 but wrote no probe reports"


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the cell's process group (torchrun and its workers, or the demo's ranks), wait
    for all of it to exit, SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or the group never empties
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    proc.wait()


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def run(args: argparse.Namespace) -> int:
    if args.repeat < 1 or (args.iters is not None and args.iters < 1):
        raise UsageError("--repeat and --iters must be at least 1")
    if args.demo and args.targets:
        raise UsageError("give recipes or --demo, not both")
    if args.demo and args.megatron_args:
        raise UsageError("Megatron args after -- are for recipe cells; --demo takes none")
    out = Path(args.out)
    cells = demo_cells(args, out) if args.demo else recipe_cells(args, out)
    if args.wandb:
        _to_wandb(cells, args.group or out.resolve().name, demo=args.demo)
    if args.dry_run:
        import shlex

        for cell in cells:
            print(f"# {cell.name}\n{shlex.join(cell.command)} > {out / cell.name / cell.log_name} 2>&1")
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc}") from None

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console() if sys.stdout.isatty() else Console(width=160)
    previous = {c["name"]: c for c in _load_manifest(out).get("cells", [])}
    argv = sys.argv[1:]
    for cell in cells:
        old = previous.get(cell.name)
        if not args.rerun and old and old["status"] == "ok" and old["command"] == cell.command and \
                (out / cell.name / "intervals.jsonl").is_file():
            cell.status, cell.exit_code, cell.seconds = "ok", 0, old["seconds"]
            cell.extra["resumed"] = True
    todo = [c for c in cells if c.status != "ok"]
    if len(todo) < len(cells):
        console.print(f"{len(cells) - len(todo)} of {len(cells)} cells already finished in {out / MANIFEST}; "
                      f"training {len(todo)} (--rerun trains all)")
    _save_manifest(out, cells, argv)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("matrix", total=len(todo))
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _raise_stopped)
        for i, cell in enumerate(todo, 1):
            progress.update(task, description=f"training {cell.name}")
            try:
                run_cell(cell, out, args.cell_timeout, started=lambda: _save_manifest(out, cells, argv))
            except (KeyboardInterrupt, Stopped) as exc:
                _save_manifest(out, cells, argv)
                console.print(f"[yellow]interrupted in {cell.name}; run the same command again to resume[/]")
                return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)
            _save_manifest(out, cells, argv)
            mark = "[green]ok[/]" if cell.status == "ok" else f"[red]{cell.status}[/] (exit {cell.exit_code})"
            progress.console.print(f"[{i}/{len(todo)}] {cell.name}: {mark} in {cell.seconds:.0f} s")
            progress.advance(task)
    return summarize(cells, out, args, console)


def summarize(cells: list[Cell], out: Path, args: argparse.Namespace, console) -> int:
    from megatron_moe_probe import compare

    failed = [c for c in cells if c.status != "ok"]
    for cell in failed:
        reason = cell.extra.get("reason", f"exit code {cell.exit_code}")
        console.print(f"[red]{cell.name} failed[/] ({reason}); end of {out / cell.name / cell.log_name}:\n"
                      f"{log_tail(out / cell.name / cell.log_name)}")
    done = [c for c in cells if c.status == "ok"]
    if not done:
        console.print("[red]no cell finished[/]")
        return 1
    warmup = args.warmup if args.warmup is not None else (args.iters or 40) // 4
    # Loss parity is between cells that differ only in dispatcher/recipe: same EP and data.
    parity = [json.dumps({k: v for k, v in c.params.items() if k not in ("dispatcher", "recipe")}, sort_keys=True)
              for c in done]
    rows = compare.compare([out / c.name for c in done], {}, warmup, parity_groups=parity)
    for row, cell in zip(rows, done):
        row.update(cell=cell.name, group=cell.group, params=cell.params, seconds=cell.seconds)
    compare.print_table(rows)
    spread = repeat_spread(rows)
    if spread:
        _print_spread(spread, console)
    (out / "compare.json").write_text(json.dumps({"rows": rows, "repeat_spread": spread}, indent=1, default=str))
    compare.plot_runs(rows, out / "layers.png")
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
        ax.bar(x, mid, yerr=[low, high], capsize=3, color="tab:blue", alpha=0.8)
        ax.set_title(label, fontsize="medium")
        ax.set_xticks(list(x), list(groups), rotation=60, ha="right", fontsize="small")
        if key != "ms_per_iter":
            ax.set_ylim(bottom=min(1.0, *[m for m in mid if not math.isnan(m)]) if key != "gini" else 0)
    fig.suptitle("matrix: median per cell, bars = min-max over repeats")
    fig.savefig(path, dpi=110)


def repeat_spread(rows: list[dict]) -> list[dict]:
    """Per group of identical runs: median ms/iter and (max - min) / median, the run-to-run noise."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        ms = row.get("ms_per_iter")
        if ms is not None and not math.isnan(ms):
            groups.setdefault(row["group"], []).append(ms)
    return [{"group": g, "runs": len(v), "median_ms_per_iter": statistics.median(v),
             "spread": (max(v) - min(v)) / statistics.median(v)} for g, v in groups.items() if len(v) > 1]


def _print_spread(spread: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="step time between identical runs (the noise floor)")
    for col in ("cells", "runs", "median ms/iter", "(max-min)/median"):
        table.add_column(col, justify="left" if col == "cells" else "right")
    for s in spread:
        table.add_row(s["group"], str(s["runs"]), f"{s['median_ms_per_iter']:.1f}", f"{s['spread']:.1%}")
    console.print(table)
