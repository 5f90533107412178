"""Probe runs read back from wandb, for `moe-probe compare`.

A wandb run is named in one of two ways:
  - its folder on disk, the one holding `run-ID.wandb` (`OUT/wandb/offline-run-*` for the
    offline runs WandbWriter starts; an online run's `run-*` folder holds the same file): no network;
  - `wandb:ENTITY/PROJECT/RUN_ID`: through `wandb.Api().run(...)`, with network and a login.

What the row is made of:
  - per-layer statistics: the scalars WandbWriter logs (IntervalReport.scalars(),
    `moe/layer_NN/<stat>` at step = training iteration); every step holding such keys is
    one interval, as a record of the local store is. `moe/all/...` aggregates are not
    used: compare takes its own medians (run_row.comparison_row);
  - dispatcher, EP, data: the `moe_probe` config key (WandbWriter.write_meta: the probe's run
    meta, with Megatron's args), else Megatron's own config (`wandb.init(config=vars(args))`:
    `moe_token_dispatcher_type`, `expert_model_parallel_size`); None where neither has it;
  - training numbers: the keys megatron.training.training.training_log (megatron-core
    0.19) logs to wandb on the last rank:
      `iteration-time`  seconds per iteration (with --log-timers-to-tensorboard)
      `throughput`      TFLOP/s/GPU (with --log-throughput and --log-timers-to-tensorboard)
      `lm loss`         that iteration's loss, every --tensorboard-log-interval; logged
                        only when a TensorBoard writer exists (--tensorboard-dir)
    Memory is logged to TensorBoard only (`mem-max-allocated-bytes`), never to wandb, so
    max mem is NaN unless `--log RUN=FILE` names Megatron's stdout.

The `.wandb` file is wandb's transaction log: a 7-byte header (`:W&B`, magic 0xBEE1,
version 0), then LevelDB log format: 32 KiB blocks of chunks (crc32 u32, length u16,
type u8: full, first, middle, last), each record a protobuf `Record`. wandb 0.31 reads it
only in its Go core (wandb-core, which `wandb sync` drives); the Python reader of older
versions (`wandb.sdk.internal.datastore.DataStore`) is gone. So the chunks are joined here
and decoded with wandb's own `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.offline.run_row import comparison_row, run_dispatcher, with_runtime_proof
from megatron_moe_probe.offline.train_log import TrainLog, read_train_log

WANDB_PREFIX = "wandb:"
_PROBE_KEY = re.compile(r"^moe/layer_(\d+)/(.+)$")
# Megatron's wandb key -> (its field name in Megatron's stdout line, which compare reads; factor).
MEGATRON_KEYS = {
    "iteration-time": ("elapsed time per iteration (ms)", 1000.0),
    "throughput": ("throughput per GPU (TFLOP/s/GPU)", 1.0),
    "lm loss": ("lm loss", 1.0),
}

_FILE_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def is_wandb_run(run: str | Path) -> bool:
    return str(run).startswith(WANDB_PREFIX) or bool(_transaction_logs(Path(run)))


def _transaction_logs(folder: Path) -> list[Path]:
    return sorted(folder.glob("run-*.wandb")) if folder.is_dir() else []


def _wandb():
    try:
        import wandb
    except ImportError as exc:
        raise UsageError("reading wandb runs needs wandb: pip install megatron-moe-probe[wandb]") from exc
    return wandb


def _record_class():
    wandb = _wandb()
    try:
        from wandb.proto.wandb_internal_pb2 import Record
    except ImportError as exc:
        raise UsageError(f"wandb {wandb.__version__} has no wandb.proto.wandb_internal_pb2.Record, which "
                         "reading an offline run needs; read the run with `wandb:ENTITY/PROJECT/RUN_ID` "
                         "after `wandb sync`") from exc
    return Record


def read_records(path: Path) -> list[Any]:
    """The records of a `.wandb` file. A last record still being written (or cut short by a
    kill) is left out; a chunk whose checksum fails is an error."""
    record_class = _record_class()
    data = path.read_bytes()
    if data[: len(_FILE_HEADER)] != _FILE_HEADER:
        raise UsageError(f"{path}: not a wandb transaction log of the format this reader knows "
                         f"(header {data[:7]!r}; wandb {_wandb().__version__} is installed)")
    records, pending, pos = [], None, len(_FILE_HEADER)
    while pos + _CHUNK.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        where = f"{path}: chunk at byte {pos}"
        if _CHUNK.size + length > room:  # chunks never cross a block boundary
            raise UsageError(f"{where} is corrupt (length {length})")
        chunk = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        if len(chunk) < length:
            break
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise UsageError(f"{where} is corrupt (checksum mismatch)")
        pos += _CHUNK.size + length
        if kind == _FULL:
            whole = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += chunk
            if kind == _MIDDLE:
                continue
            whole, pending = pending, None
        else:
            raise UsageError(f"{where} is corrupt (unexpected chunk type {kind})")
        record = record_class()
        record.ParseFromString(whole)
        records.append(record)
    return records


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_offline(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, history rows) of a wandb run folder."""
    logs = _transaction_logs(folder)
    if len(logs) != 1:
        raise UsageError(f"{folder}: expected one run-*.wandb file, found {len(logs)}")
    config: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for record in read_records(logs[0]):
        kind = record.WhichOneof("record_type")
        # wandb.init(config=...) arrives in the run record, config.update() in config records.
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else ()
        config.update({_key(u): json.loads(u.value_json) for u in updates})
        if kind == "history":
            rows.append({_key(item): json.loads(item.value_json) for item in record.history.item})
    return config, rows


def read_online(path: str, timeout: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, history rows) of `ENTITY/PROJECT/RUN_ID` through the wandb API."""
    if len([p for p in path.split("/") if p]) != 3:
        raise UsageError(f"{WANDB_PREFIX}{path}: expected {WANDB_PREFIX}ENTITY/PROJECT/RUN_ID")
    wandb = _wandb()
    try:
        # wandb's service process makes the requests. If this side stops waiting before the service
        # has given up (its default retries last minutes), exiting can hang on the service: so the
        # service gets a try, one retry and `timeout` each, and this side waits longer than that.
        wandb.setup(wandb.Settings(x_graphql_timeout_seconds=timeout, x_graphql_retry_max=1,
                                   x_graphql_retry_wait_max_seconds=1))
        run = wandb.Api(timeout=2 * timeout + 5).run(path)
        return dict(run.config), list(run.scan_history())
    except (wandb.errors.Error, OSError) as exc:
        raise UsageError(f"{WANDB_PREFIX}{path}: cannot reach wandb or read the run ({exc}). Without network, "
                         "compare the offline run folder (OUT/wandb/offline-run-*) instead, or upload it "
                         "first with `wandb sync`") from exc


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def intervals_and_log(rows: list[dict[str, Any]]) -> tuple[list[tuple[int, dict[int, dict]]], TrainLog | None]:
    """History rows -> the probe's intervals and Megatron's numbers (None when it logged none)."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:  # wandb may hand one step over in several rows
        if _number(row.get("_step")):
            by_step.setdefault(int(row["_step"]), {}).update(row)
    intervals, log = [], TrainLog()
    for step in sorted(by_step):
        layers: dict[int, dict[str, float]] = {}
        fields: dict[str, float] = {}
        for key, value in by_step[step].items():
            if not _number(value):  # media, histograms, None
                continue
            match = _PROBE_KEY.match(key)
            if match:
                layers.setdefault(int(match[1]), {})[match[2]] = float(value)
            elif key in MEGATRON_KEYS:
                name, factor = MEGATRON_KEYS[key]
                fields[name] = float(value) * factor
        if layers:
            intervals.append((step, layers))
        if fields:
            log.iterations.append(step)
            log.fields.append(fields)
    return intervals, (log if log.fields else None)


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """dispatcher, ep, data and the other grouping keys (grouping.py) of a run from its wandb config."""
    from megatron_moe_probe.grouping import group_keys
    from megatron_moe_probe.record.run_meta import settings_of

    probe = config.get("moe_probe") or {}
    keys = group_keys(probe, environ={})  # moe_probe.group, as the writer resolved it
    settings, _ = settings_of(probe)
    return {
        **keys,
        "dispatcher": run_dispatcher(probe) or config.get("moe_token_dispatcher_type") or keys["dispatcher"],
        "ep": settings.expert_parallel or config.get("expert_model_parallel_size") or keys["ep"],
        "data": probe.get("data") or keys["data"],
    }


def wandb_run_row(run: str, explicit_log: Path | None, warmup: int, timeout: int) -> dict:
    """compare's row for a wandb run folder or `wandb:ENTITY/PROJECT/RUN_ID`."""
    if run.startswith(WANDB_PREFIX):
        config, rows = read_online(run[len(WANDB_PREFIX) :], timeout)
    else:
        config, rows = read_offline(Path(run))
    intervals, log = intervals_and_log(rows)
    if explicit_log is not None:
        log = read_train_log(explicit_log)
    name = run if run.startswith(WANDB_PREFIX) else str(Path(run))
    row = comparison_row(name, identity(config), intervals, log, warmup)
    # wandb holds the run's meta (config `moe_probe`) but not the per-record runtime proof.
    return with_runtime_proof(row, config.get("moe_probe") or {}, [])
