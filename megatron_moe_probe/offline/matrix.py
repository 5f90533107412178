"""A grid of training runs (`moe-probe matrix`): the cells, training them one after another, the manifest.

GPU (Megatron pretraining through `moe-probe train`), targets are recipes:
    moe-probe matrix tiny-gpu:ep4 tiny-gpu:ep4-allgather --data recipe,/data/textds \\
        --iters 100 --repeat 2 --out runs/m1 [-- extra Megatron args for every cell]
CPU (`moe-probe demo`: real Megatron MoE layers over gloo), the grid is EP x dispatcher x data:
    moe-probe matrix --demo --ep 2,4,8 --dispatcher alltoall,allgather --data text,mock --out runs/m2
The matched dispatcher A/B that `moe-probe recommend` prints forces backends into every recipe:
    moe-probe matrix RECIPE --dispatcher alltoall,deepep,hybridep --repeat 3 --out runs/ab -- BENCHMARK ARGS

Each cell trains in its own process group into OUT/<cell>/ (the probe's local store and
the training's own log). Its outcome goes to OUT/matrix.json the moment it ends, so an
interrupted matrix resumes where it stopped: finished cells are skipped unless --rerun.
A failed cell does not stop the others; the summary names it with the end of its log and
the exit code is 1. Then `moe-probe compare` over the finished cells (table,
OUT/compare.json, OUT/compare.png) and, with --repeat, the spread of step time between
identical runs: the noise floor that a difference between dispatchers has to beat.

A cell whose requested backend did not run (its import failed, or the probe's runtime proof
names another backend) is an environment limit, not a failed or slow dispatcher: it is kept
out of the performance comparison and listed under `environment_limits` in compare.json.
"""

from __future__ import annotations

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
from megatron_moe_probe import lifetime
from megatron_moe_probe.record import INTERVALS_FILE, atomic_write_text, to_json_safe
from megatron_moe_probe.settings import FLAGS, probe_flags

MANIFEST = "matrix.json"
# Each cell runs the `moe-probe` command line in a process of its own.
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


def demo_cells(out: Path, eps: list[int], dispatchers: list[str], data: list[str], iters: int | None = None,
               global_batch: int | None = None, repeat: int = 1) -> list[Cell]:
    """CPU cells (`moe-probe demo`): EP x dispatcher x data."""
    from megatron_moe_probe.cpu.demo import DATA_SOURCES, DISPATCHERS, RANKS

    if bad := [e for e in eps if e not in RANKS]:
        choices = f"{', '.join(map(str, RANKS[:-1]))} or {RANKS[-1]}"
        raise UsageError(f"--demo runs EP {choices} (one process per EP rank), not {bad}")
    if bad := [d for d in dispatchers if d not in DISPATCHERS]:
        raise UsageError(f"--demo dispatchers are {' and '.join(DISPATCHERS)}, not {bad}")
    if bad := [d for d in data if d not in DATA_SOURCES]:
        raise UsageError(f"--demo data is one of {', '.join(DATA_SOURCES)}, not {bad}")
    if global_batch is not None and (global_batch < 1 or any(global_batch % ep for ep in eps)):
        raise UsageError(f"--global-batch {global_batch} must be a multiple of every EP in {eps}")
    experts = max(8, *eps)  # the same model in every cell, whatever its EP
    grid = []
    for ep, dispatcher, source in itertools.product(eps, dispatchers, data):
        cmd = [*CLI, "demo", "--ranks", str(ep), "--dispatcher", dispatcher, "--data", source,
               "--experts", str(experts), "--steps", str(iters or 40), "--quiet",
               *(["--global-batch", str(global_batch)] if global_batch else []), "--out"]
        grid.append((f"ep{ep}-{dispatcher}-{source}", {"ep": ep, "dispatcher": dispatcher, "data": source,
                                                       "experts": experts, "global_batch": global_batch},
                     cmd, []))
    return _with_repeats(grid, repeat, out, "demo.log")


def recipe_cells(out: Path, targets: list[str], data: list[str], iters: int | None = None, repeat: int = 1,
                 megatron_args: list[str] | None = None, dispatchers: list[str] | None = None,
                 assume_installed: str | None = None, node_rank: int | None = None,
                 master_addr: str | None = None, master_port: int | None = None,
                 per_node_rendezvous: bool = True) -> list[Cell]:
    """GPU cells (`moe-probe train`): recipe x dispatcher x data; `data` entries are `recipe` or
    dataset prefixes; `dispatchers` are backend ids forced in every recipe (None: the recipe's own);
    `assume_installed` goes to every cell's `moe-probe train`. A recipe on several nodes gets this
    node's rank and node 0's address (the shell variables $NODE_RANK / $MASTER_ADDR when not given:
    the printed commands then run on every node as they are, with those variables set);
    `per_node_rendezvous=False` leaves those flags out (Slurm's srun sets the rendezvous)."""
    from megatron_moe_probe.torchrun import MASTER_ADDR_VAR, NODE_RANK_VAR
    from megatron_moe_probe import recipes
    from megatron_moe_probe.dataset_files import require_dataset

    if not targets:
        raise UsageError("name recipes to train (moe-probe render --list), or give --demo")
    # Loading each recipe now makes a typo fail before an hour of other cells, not after.
    loaded = {target: recipes.load_recipe(target) for target in targets}
    forced: list[str | None] = list(dispatchers) if dispatchers else [None]
    for d in forced:
        if d is not None:
            recipes.with_dispatcher(next(iter(loaded.values())), d)  # an unknown backend fails here
    for prefix in data:
        if prefix != "recipe":
            require_dataset(prefix, "--data", "`recipe` means the recipe's own data")
    assume = ["--assume-installed", assume_installed] if assume_installed is not None else []
    grid = []
    for target, dispatcher, prefix in itertools.product(targets, forced, data):
        name = target.replace(":", "-").replace("/", "_") + ("" if dispatcher is None else f"-{dispatcher}") + \
            ("" if prefix == "recipe" else f"-{Path(prefix).name}")
        nodes = loaded[target].parallelism.nodes
        multi = [] if nodes == 1 or not per_node_rendezvous else [
            "--node-rank", NODE_RANK_VAR if node_rank is None else str(node_rank),
            "--master-addr", master_addr or MASTER_ADDR_VAR,
            *(["--master-port", str(master_port)] if master_port is not None else [])]
        cmd = [*CLI, "train", target, *([] if dispatcher is None else ["--dispatcher", dispatcher]), *assume, *multi,
               *([] if prefix == "recipe" else ["--data-path", prefix]), "--",
               *(["--train-iters", str(iters)] if iters else []),
               *probe_flags(writers=["local"]), FLAGS["out_dir"]]
        params = {"recipe": target, "ep": loaded[target].parallelism.ep, "data": prefix}
        if dispatcher is not None:
            params["dispatcher"] = dispatcher
        grid.append((name, params, cmd, list(megatron_args or [])))
    return _with_repeats(grid, repeat, out, "megatron.log")


def validate_recipe_cells(cells: list[Cell], assume_installed: str | None) -> list[str]:
    """Render every recipe cell as `moe-probe train` would (recipe, forced dispatcher, availability
    gate, data): a cell that cannot start fails here, before anything trains. Returns one line per cell."""
    from megatron_moe_probe import recipes
    from megatron_moe_probe.selection.availability import availability_for
    from megatron_moe_probe.selection.card import default_card

    card = default_card()
    availability = availability_for(card, assume_installed)
    lines = []
    for cell in cells:
        r = recipes.load_recipe(cell.params["recipe"])
        if cell.params.get("dispatcher"):
            r = recipes.with_dispatcher(r, cell.params["dispatcher"])
        resolved = recipes.resolve_dispatcher(r, availability)
        recipes.render(r, resolved=resolved)
        lines.append(f"## validated: dispatcher {resolved.backend}, world size {r.parallelism.world_size}"
                     + "".join(f"; {k}={v}" for k, v in resolved.env.items()))
    return lines


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


def to_wandb(cells: list[Cell], group: str, demo: bool) -> None:
    """Every cell also writes to wandb, into one group; its grid parameters become the grouping
    keys (`moe_probe.group` in the run's config, grouping.py). The wandb variables are wandb's own,
    so Megatron's own wandb run (GPU cells with --wandb-project) is grouped the same way."""
    from megatron_moe_probe.grouping import GROUP_ENV, KEYS_ENV

    flag = "--writers" if demo else FLAGS["writers"]
    for cell in cells:
        if flag in cell.command:
            cell.command[cell.command.index(flag) + 1] = "local,wandb"
        else:  # the demo's command has no --writers: before its `--out DIR`
            cell.command[-2:-2] = [flag, "local,wandb"]
        keys = {k: v for k, v in cell.params.items() if k in ("dispatcher", "ep", "data", "recipe")}
        cell.env = {GROUP_ENV: group, KEYS_ENV: json.dumps({"group": group, **keys}), "WANDB_NAME": cell.name,
                    "WANDB_JOB_TYPE": cell.group}


# -- running --------------------------------------------------------------------------------------

def load_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    from megatron_moe_probe.offline.manifest import parse_manifest

    try:
        return parse_manifest(json.loads(path.read_text(encoding="utf-8")), path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is not valid JSON; move it away to start this matrix afresh") from None


def save_manifest(out: Path, cells: list[Cell], argv: list[str]) -> None:
    # Never half a manifest, even when killed mid-write.
    atomic_write_text(out / MANIFEST, json.dumps({"argv": argv, "cells": [asdict(c) for c in cells]}, indent=1))


OUTPUTS = (MANIFEST, "compare.json", "compare.png", "layers.png")  # what the matrix writes into OUT


def check_out_folder(out: Path, cells: list[Cell]) -> None:
    """One matrix per folder, and nothing of the user's touched: OUT is new, empty of the names
    this matrix writes (its outputs, one folder per cell), or holds this matrix's matrix.json
    (then it resumes, and retrains only cell folders that matrix.json lists). UsageError otherwise."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    known = {c["name"] for c in load_manifest(out).get("cells", [])} if (out / MANIFEST).is_file() else None
    names = [c.name for c in cells]
    if known is None:
        taken = [n for n in (*OUTPUTS, *names) if (out / n).exists()]
        if taken:
            raise UsageError(f"--out {out} already holds {', '.join(taken[:4])}{' ...' if len(taken) > 4 else ''} "
                             "and no matrix.json of a matrix run; choose a new --out (nothing was changed)")
        return
    strangers = [n for n in names if (out / n).exists() and n not in known]
    if strangers:
        raise UsageError(f"--out {out}: folder(s) {', '.join(strangers[:4])} are not cells of the matrix in "
                         f"{out / MANIFEST}; choose a new --out (nothing was changed)")


def mark_finished(cells: list[Cell], out: Path, rerun: bool = False) -> list[Cell]:
    """Cells that matrix.json says finished with the same command (and whose records are there)
    are marked ok and resumed; returns the cells still to train."""
    previous = {c["name"]: c for c in load_manifest(out).get("cells", [])}
    for cell in cells:
        old = previous.get(cell.name)
        if not rerun and old and old["status"] == "ok" and old["command"] == cell.command and \
                (out / cell.name / INTERVALS_FILE).is_file():
            cell.status, cell.exit_code, cell.seconds = "ok", 0, old["seconds"]
            cell.extra["resumed"] = True
    return [c for c in cells if c.status != "ok"]


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
        # An earlier attempt of this cell (check_out_folder allowed only those): it would mix its
        # reports into this one.
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(cell_dir / cell.log_name, "wb") as log:
        # Under the guard (lifetime.py): the cell, torchrun's workers included, stops when the
        # matrix dies, whatever the signal; the guard leads the cell's session.
        proc = subprocess.Popen(lifetime.guarded(cell.command), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **cell.env} if cell.env else None)
        cell.extra["pid"] = proc.pid  # the guard: also the cell's process group and session id
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
    if cell.status == "ok" and not (cell_dir / INTERVALS_FILE).is_file():
        cell.status, cell.extra["reason"] = "failed", "exited 0 but wrote no probe reports"


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
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


def import_failure(log: Path) -> str | None:
    """The backend import error Megatron raised in a cell's log (the card's messages), or None:
    such a cell is an environment limit, not a failed or slow dispatcher."""
    from megatron_moe_probe.selection.card import default_card

    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for b in default_card().backends:
        if b.import_error and b.import_error.split(". ")[0] in text:
            return f"{b.label}: {b.import_error.split('. ')[0]}"
    return None


def mark_environment_limits(cells: list[Cell], out: Path) -> list[Cell]:
    """Failed cells whose log shows a backend import failure get `extra['environment_limit']`;
    returns those cells."""
    limited = []
    for cell in cells:
        if cell.status != "ok":
            limit = import_failure(out / cell.name / cell.log_name)
            if limit:
                cell.extra["environment_limit"] = limit
                limited.append(cell)
    return limited


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise Stopped in the matrix process (see Stopped)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stopped)


def compare_cells(cells: list[Cell], out: Path, warmup: int) -> tuple[list[dict], list[dict]]:
    """compare's rows for the finished cells (with cell, group, params, seconds) and the repeat
    spread; both written to OUT/compare.json, with the environment limits (failed cells that
    mark_environment_limits marked, and finished cells whose runtime proof names another backend)."""
    from megatron_moe_probe.offline.compare import compare

    done = [c for c in cells if c.status == "ok"]
    # Loss parity is between cells that differ only in dispatcher/recipe: same EP and data.
    parity = [json.dumps({k: v for k, v in c.params.items() if k not in ("dispatcher", "recipe")}, sort_keys=True)
              for c in done]
    rows = compare([out / c.name for c in done], {}, warmup, parity_groups=parity)
    for row, cell in zip(rows, done):
        row.update(cell=cell.name, group=cell.group, params=cell.params, seconds=cell.seconds)
    limits = [{"cell": c.name, "group": c.group, "params": c.params, "status": "environment limit",
               "environment_limit": c.extra["environment_limit"]}
              for c in cells if c.status != "ok" and c.extra.get("environment_limit")]
    limits += [{"cell": r["cell"], "group": r["group"], "params": r["params"], "status": "environment limit",
                "environment_limit": r["environment_limit"]} for r in rows if r.get("status") == "environment limit"]
    spread = repeat_spread(rows)
    atomic_write_text(out / "compare.json", json.dumps(  # strict JSON: NaN -> null
        to_json_safe({"rows": rows, "repeat_spread": spread, "environment_limits": limits}), indent=1, allow_nan=False))
    return rows, spread


def repeat_spread(rows: list[dict]) -> list[dict]:
    """Per group of identical runs: median ms/iter and (max - min) / median, the run-to-run noise."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        ms = row.get("ms_per_iter")
        if ms is not None and not math.isnan(ms):
            groups.setdefault(row["group"], []).append(ms)
    return [{"group": g, "runs": len(v), "median_ms_per_iter": statistics.median(v),
             "spread": (max(v) - min(v)) / statistics.median(v)} for g, v in groups.items() if len(v) > 1]


