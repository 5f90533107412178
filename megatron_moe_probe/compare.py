"""`moe-probe compare RUN...`: runs side by side, from the local store, wandb and Megatron's log.

Each RUN is one of
  - a probe run folder (the local writer's `intervals.jsonl` + `meta.json`);
  - a wandb run folder, the one holding `run-ID.wandb` (`OUT/wandb/offline-run-*` of an
    offline run), read from that file without network;
  - `wandb:ENTITY/PROJECT/RUN_ID`, read through the wandb API (network and a login).
Runs of all kinds mix in one table (wandb_source.py says what is read from wandb).

Megatron's own numbers: iteration time and TFLOP/s (medians over the intervals after
`--warmup`), the largest `max allocated` memory, and the last logged LM loss, with its
difference to the first run's (loss parity between dispatchers). They come from
`RUN/megatron.log` (or the file `--log RUN=FILE` names; `train.jsonl` for `moe-probe demo`
runs), and for a wandb run from the keys Megatron logs to wandb, which hold no memory.
The probe's statistics are computed the same way for every kind of run, by `summarize`.
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
STATS = ("max_over_mean", "max_over_mean_step_worst", "gini", "rank_max_over_mean", "receiver_skew",
         "inter_node_fraction", *TIMING)


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


def run_dispatcher(meta: dict):
    """The probe meta's dispatcher as one string (a run may name several)."""
    dispatcher = meta.get("dispatcher")
    return ",".join(dispatcher) if isinstance(dispatcher, list) else dispatcher


def summarize(run: str, identity: dict, intervals: list[tuple[int, dict[int, dict]]], log, warmup: int) -> dict:
    """One row of the table. identity: dispatcher, ep, data; intervals: (step, layer -> that
    layer's statistics) per probe report; log: Megatron's numbers (a TrainLog) or None."""
    kept = [by_layer for step, by_layer in intervals if step > warmup] or [by_layer for _, by_layer in intervals]
    if not kept:
        raise UsageError(f"{run}: no probe reports")
    layers = sorted({n for by_layer in kept for n in by_layer})
    series = {n: [by_layer[n] for by_layer in kept if n in by_layer] for n in layers}
    per_layer = {key: [_median([x.get(key, math.nan) for x in series[n]]) for n in layers] for key in STATS}
    row = {"run": run, **identity, "intervals": len(kept), "layers": layers}
    row.update({key: _median(values) for key, values in per_layer.items()})
    row["max_over_mean_per_layer"] = per_layer["max_over_mean"]
    if log is not None:
        after = [f for it, f in zip(log.iterations, log.fields) if it > warmup] or log.fields
        row["ms_per_iter"] = _median([f.get("elapsed time per iteration (ms)") for f in after])
        row["tflops_per_gpu"] = _median([f.get("throughput per GPU (TFLOP/s/GPU)") for f in after])
        row["max_allocated_mb"] = max(log.max_allocated_mb.values()) if log.max_allocated_mb else math.nan
        losses = log.series("lm loss")
        row["final_iteration"], row["final_lm_loss"] = losses[-1] if losses else (None, math.nan)
    return row


def summarize_run(run: Path, log, warmup: int) -> dict:
    from megatron_moe_probe.offline import megatron_dumps
    from megatron_moe_probe.writers.local import load_run

    meta, reports = megatron_dumps.load_if_dump(run) or load_run(run)
    from megatron_moe_probe.grouping import group_keys

    keys = group_keys(meta, environ={})
    identity = {**keys, "dispatcher": run_dispatcher(meta) or keys["dispatcher"],
                "ep": reports[-1].ep_size if reports else keys["ep"], "data": meta.get("data") or keys["data"]}
    return summarize(str(run), identity, [(r.step, dict(zip(r.layers, r.per_layer))) for r in reports], log, warmup)


def compare(runs: list[str | Path], logs: dict[str, Path], warmup: int, wandb_timeout: int = 30,
            parity_groups: list[str] | None = None) -> list[dict]:
    """One row per run. `loss_delta_vs_first` is each run's final loss minus that of the first run
    in its parity group (default: one group, the first run)."""
    from megatron_moe_probe import wandb_source

    rows = []
    for run in runs:
        explicit = logs.get(str(Path(run)))
        if wandb_source.is_wandb_run(run):
            rows.append(wandb_source.summarize_wandb_run(str(run), explicit, warmup, wandb_timeout))
        elif Path(run).is_dir():
            rows.append(summarize_run(Path(run), training_log(Path(run), explicit), warmup))
        else:
            raise UsageError(f"not a run folder: {run} (give a probe run folder, a wandb run folder "
                             "or wandb:ENTITY/PROJECT/RUN_ID)")
    first_loss: dict[str, float] = {}
    for row, group in zip(rows, parity_groups or [""] * len(rows)):
        loss = row.get("final_lm_loss", math.nan)
        row["loss_delta_vs_first"] = loss - first_loss.setdefault(group, loss)
    return rows


def run(args: argparse.Namespace) -> int:
    logs = {}
    for item in args.log:
        run_dir, sep, file = item.partition("=")
        if not sep or not Path(file).is_file():
            raise UsageError(f"--log wants RUN=FILE with an existing file, got {item!r}")
        logs[str(Path(run_dir))] = Path(file)
    rows = compare(args.runs, logs, args.warmup, args.wandb_timeout)
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
