"""Runs side by side (`moe-probe compare`), from the local store, wandb and Megatron's log.

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
The probe's statistics are computed the same way for every kind of run (run_row.py).

Runtime proof: a probe run records what its live MoE layers ran (`runtime_dispatchers`,
megatron/runtime.py). A run whose requested backend did not run is an environment limit:
its performance numbers move out of the comparison (`not_performance_data`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from megatron_moe_probe import record
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.offline import wandb_source
from megatron_moe_probe.offline.run_row import comparison_row, run_data, run_dispatcher, with_runtime_proof
from megatron_moe_probe.offline.train_log import TrainLog, read_train_jsonl, read_train_log



def training_log(run: Path, explicit: Path | None = None) -> TrainLog | None:
    """Megatron's numbers for a run: --log FILE, RUN/megatron.log, or the demo's RUN/train.jsonl."""
    if explicit is not None:
        return read_train_log(explicit)
    if (run / "megatron.log").is_file():
        return read_train_log(run / "megatron.log")
    if (run / "train.jsonl").is_file():
        return read_train_jsonl(run / "train.jsonl")
    return None


def local_run_row(run: Path, log: TrainLog | None, warmup: int, load_run: Callable = record.load_run) -> dict:
    """compare's row for a probe run folder (or, with `load_run` = megatron_dumps.load_run_or_dump,
    a Megatron routing dump), with its runtime proof."""
    from megatron_moe_probe.grouping import group_keys

    meta, reports = load_run(run)
    keys = group_keys(meta, environ={})
    identity = {**keys, "dispatcher": run_dispatcher(meta) or keys["dispatcher"],
                "ep": reports[-1].ep_size if reports else keys["ep"], "data": run_data(meta) or keys["data"]}
    row = comparison_row(str(run), identity, [(r.step, dict(zip(r.layers, r.per_layer))) for r in reports], log,
                         warmup)
    return with_runtime_proof(row, meta, reports)


def compare(runs: list[str | Path], logs: dict[str, Path], warmup: int, wandb_timeout: int = 30,
            parity_groups: list[str] | None = None, load_run: Callable = record.load_run) -> list[dict]:
    """One row per run; `load_run` reads a local folder ((meta, reports); the CLI passes one that
    reads Megatron's dumps too, which needs torch: this module does not). `loss_delta_vs_first` is each run's final loss minus that of the first run
    in its parity group (default: runs on the same data; losses on different data do not compare)."""
    rows = []
    for run in runs:
        explicit = logs.get(str(Path(run)))
        if wandb_source.is_wandb_run(run):
            rows.append(wandb_source.wandb_run_row(str(run), explicit, warmup, wandb_timeout))
        elif Path(run).is_dir():
            rows.append(local_run_row(Path(run), training_log(Path(run), explicit), warmup, load_run))
        else:
            raise UsageError(f"not a run folder: {run} (give a probe run folder, a wandb run folder "
                             "or wandb:ENTITY/PROJECT/RUN_ID)")
    groups = parity_groups or [str(row.get("data")) for row in rows]
    first_loss: dict[str, float] = {}
    for row, group in zip(rows, groups):
        loss = row.get("final_lm_loss", math.nan)
        if row.get("status") == "environment limit":
            row["loss_delta_vs_first"] = math.nan  # not a reference for the others either
            continue
        # A run alone on its data has nothing to be compared with: no delta, not a 0.
        alone = len(rows) > 1 and sum(g == group and r.get("status") != "environment limit"
                                      for r, g in zip(rows, groups)) == 1
        row["loss_delta_vs_first"] = math.nan if alone else loss - first_loss.setdefault(group, loss)
    return rows
