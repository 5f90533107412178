"""The record: what one log interval of the probe says, and the run folder that holds it.

This module is the one home of the record format:
- `IntervalReport`, the plain-data record of one interval (no tensors, JSON as is);
- the names of its per-layer statistics (`KNOWN_STATS` and the groups it is built from);
- its on-disk form, a run folder:

    meta.json         run metadata (args, versions, hardware, dispatcher, ...), written
                      atomically (temp file + fsync + os.replace) so it is never half there
    intervals.jsonl   one IntervalReport.to_dict() per line, strict JSON (NaN/inf -> null)
    layers.parquet    one row per (step, layer), every per-layer statistic a column;
                      derived from intervals.jsonl when pyarrow is importable

- writing it (`write_run`, `append_report`, `write_meta`, `atomic_write_text`) and reading it
  back (`load_run`, `iter_reports`, `load_meta`, `load_layer_table`), with the supersede
  rule for resumed runs (`supersede_restarts`: a record whose step is not after the previous
  one replaces the records from that step on).

Durability: every record is written with a single write() and flushed to the OS at once,
so a killed process loses at most the record being written, which the reader skips.
A writer that appends to a file whose last line was cut short truncates that fragment
first (`open_for_append`). The live writer (writers/local.py) adds only fsync-at-close.

This module must not import torch: comparison and analysis tools read runs with it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from megatron_moe_probe.errors import UsageError

log = logging.getLogger("megatron_moe_probe")

SCHEMA_VERSION = 1

# ---------------------------------------------------------------------------- statistic names

# Per-expert load statistics (stats.EXPERT_STATS gives each its function, in this order).
EXPERT_STATS = ("max_over_mean", "min_over_mean", "gini", "cv", "entropy", "dead_experts")
# Per-step statistics summarized over the interval as <name>_step_mean / <name>_step_worst.
STEP_SUMMARIZED = ("max_over_mean", "gini", "cv", "entropy", "dead_experts", "rank_max_over_mean")
STEP_SUMMARIES = ("step_mean", "step_worst")
# Token volume by where it goes: the EP rank itself, another GPU of its node, another node.
LOCALITY_STATS = ("local_tokens", "intra_node_tokens", "inter_node_tokens")
# Dispatcher phases the timer measures (megatron/timing.py); each is reported as <phase>_ms.
PHASES = ("dispatch_fwd", "combine_fwd", "dispatch_bwd", "combine_bwd")


def step_summary_name(stat: str, summary: str) -> str:
    return f"{stat}_{summary}"


def timing_stat(phase: str) -> str:
    return f"{phase}_ms"


TIMING_STATS = tuple(timing_stat(p) for p in PHASES)

# Column order of the layer table: identification first, then the statistics the
# probe reports (any subset), then unknown statistics sorted by name.
ID_COLUMNS = ("step", "steps", "time", "layer")
KNOWN_STATS: tuple[str, ...] = (
    "tokens",
    *EXPERT_STATS,
    "rank_max_over_mean",
    "receiver_skew",
    "sender_skew",
    *LOCALITY_STATS,
    "inter_node_fraction",
    "dropped_tokens",
    "dropped_fraction",
    *(step_summary_name(name, kind) for name in STEP_SUMMARIZED for kind in STEP_SUMMARIES),
    *TIMING_STATS,
)


@dataclass
class IntervalReport:
    """One log interval as plain Python data. `summarize.build_report` makes it from the probe's
    Snapshot; writers only ever see this (no tensors; it serializes to JSON as is)."""

    step: int  # training iteration that closed the interval
    steps: int  # iterations folded into this interval
    time: float  # unix time at the flush
    layers: list[int]  # global layer number (1-based, as Megatron counts) of each MoE layer reported
    num_experts: int
    ep_size: int
    # One dict per entry of `layers`: statistic name -> number (NaN where undefined).
    per_layer: list[dict[str, float]]
    # Interval-summed counts, [layer][expert] and [layer][src EP rank][dst EP rank].
    tokens_per_expert: list[list[int]]
    rank_matrix: list[list[list[int]]]
    # Tokens dropped by the capacity factor, [layer][expert]; empty when no capacity is set.
    dropped_per_expert: list[list[int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "interval"
    schema: int = SCHEMA_VERSION
    # Names of the domains (datasets of a blend) of `arrays["domain_tokens_per_expert"]`.
    domains: list[str] = field(default_factory=list)
    # The per-interval array file in the run folder (ITERATIONS_DIR/...npz), "" when none.
    arrays_file: str = ""
    # Integer arrays written to `arrays_file` by the local writer, never into the JSON line
    # (numpy arrays; see ARRAY_NAMES). Empty after reading a run: use `load_arrays`.
    arrays: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(replace(self, arrays={})).items() if k != "arrays"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IntervalReport":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def layer_names(self) -> list[str]:
        return [f"layer_{n:02d}" for n in self.layers]

    def scalars(self, prefix: str = "moe") -> dict[str, float]:
        """Flat `prefix/layer_NN/stat` series for TensorBoard/wandb, plus `prefix/all/stat`
        aggregates over layers (mean over layers, and the worst layer for imbalance)."""
        out: dict[str, float] = {}
        columns: dict[str, list[float]] = {}
        for name, row in zip(self.layer_names(), self.per_layer):
            for stat, value in row.items():
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                out[f"{prefix}/{name}/{stat}"] = float(value)
                columns.setdefault(stat, []).append(float(value))
        for stat, values in columns.items():
            out[f"{prefix}/all/{stat}_layer_mean"] = sum(values) / len(values)
            out[f"{prefix}/all/{stat}_layer_max"] = max(values)
        from megatron_moe_probe.integrity_report import extras_scalars  # integrity / router-health keys

        out.update(extras_scalars(self.meta, prefix))
        return out


# ---------------------------------------------------------------------------- run folder

META_FILE = "meta.json"
INTERVALS_FILE = "intervals.jsonl"
LAYERS_FILE = "layers.parquet"
ITERATIONS_DIR = "iterations"  # one .npz of integer arrays per interval (per-iteration and per-domain counts)
# Arrays of an interval's .npz file:
#   iterations                [S]            the iteration number of each per-iteration row
#   layers                    [L]            global layer numbers (as `layers` of the record)
#   tokens_per_expert         [S, L, E]      each iteration's own counts (sum over S = the interval's)
#   rank_matrix               [S, L, EP, EP] each iteration's rank-to-rank matrix (--moe-probe-iterations matrix)
#   domain_tokens_per_expert  [D, L, E]      the interval's counts by domain (sum over D = the interval's)
ARRAY_NAMES = ("iterations", "layers", "tokens_per_expert", "rank_matrix", "domain_tokens_per_expert")
STORE_FORMAT = "megatron_moe_probe.local/1"
_PARQUET_SIZE_KEY = b"megatron_moe_probe.intervals_bytes"


class CorruptRunError(UsageError, ValueError):
    """A run folder that cannot be read (corruption other than a cut-short last line)."""


# ---------------------------------------------------------------------------- one run per folder

# What every run writes into its folder; a command adds its own (train.jsonl, imbalance.png, ...).
RUN_FILES = (META_FILE, INTERVALS_FILE, LAYERS_FILE, ITERATIONS_DIR)


def holds_run(folder: str | os.PathLike[str]) -> bool:
    """Whether `folder` holds a moe-probe run: its meta.json names our format, or it has records."""
    folder = Path(folder)
    if (folder / INTERVALS_FILE).exists():
        return True
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("store"), dict) and \
        meta["store"].get("format") == STORE_FORMAT


def _taken(folder: Path, files: Iterable[str]) -> list[str]:
    return [name for name in dict.fromkeys((*RUN_FILES, *files)) if (folder / name).exists()]


def claim_run_folder(folder: str | os.PathLike[str], *, files: Iterable[str] = (), overwrite: bool = False,
                     flag: str = "--out") -> Path:
    """Make `folder` ready to hold one new run, or refuse with one line (UsageError).

    A folder that does not exist is created. One that has none of the run's files (RUN_FILES
    plus `files`, the names the command itself writes) is used as it is: other files in it are
    left alone. One that holds another run is refused unless `overwrite`, which removes that
    run's files (only those) first. A file of the same name that no run wrote is never touched."""
    folder = Path(folder)
    files = tuple(files)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder")
    taken = _taken(folder, files)
    if taken:
        if not holds_run(folder):
            raise UsageError(f"{flag} {folder}: {', '.join(taken)} already there and not a moe-probe run's; "
                             f"choose another {flag} (nothing was changed)")
        if not overwrite:
            raise UsageError(f"{flag} {folder} already holds a run ({', '.join(taken)}); choose a new {flag}, "
                             f"or add --overwrite to replace that run on purpose")
        for name in taken:
            target = folder / name
            if target.is_dir() and not target.is_symlink():
                import shutil

                shutil.rmtree(target)
            else:
                target.unlink()
        log.info("moe-probe: removed the earlier run in %s (--overwrite)", folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _temp_beside(folder / ".write-test")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write the run folder {folder}: {exc.strerror or exc}") from None
    return folder


def fresh_run_folder(base: str | os.PathLike[str]) -> Path:
    """A new, empty folder: `base`, else `base-2`, `base-3`, ... (created here, so two runs started
    in the same second never share one)."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder next to {base}")


def training_run_folder(folder: str | os.PathLike[str], *, resumed: bool) -> Path:
    """The folder a training run's probe writes to (Megatron flags, `moe-probe train`).

    A run resumed from a checkpoint (Megatron's iteration > 0) appends to its own folder, where
    its later records supersede those past the resumed iteration. A fresh run never writes into
    a folder that holds another run (or files of that name): it takes `<folder>-2`, `-3`, ...
    and says so once. Never raises for that (the probe must not stop training)."""
    folder = Path(folder)
    if (resumed and holds_run(folder)) or not (folder.exists() and _taken(folder, ())):
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    fresh = fresh_run_folder(folder)
    log.warning("moe-probe: %s already holds another run (this one starts at iteration 0, not resumed); "
                "writing this run to %s instead", folder, fresh)
    return fresh


# ---------------------------------------------------------------------------- encoding


def to_json_safe(obj: Any) -> Any:
    """Plain JSON data from `obj`: non-finite floats become None, tuples lists, numpy
    scalars Python numbers, paths strings, anything else its str()."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    item = getattr(obj, "item", None)  # 0-d numpy arrays / numpy and torch scalars, without importing either
    shape = getattr(obj, "shape", None)
    if callable(item) and shape is not None and len(tuple(shape)) == 0:
        try:
            return to_json_safe(item())
        except Exception:  # noqa: BLE001 - fall back to the text form
            pass
    return str(obj)


def encode_report(report: IntervalReport) -> str:
    """One line of intervals.jsonl (without the newline): strict JSON, NaN as null."""
    return json.dumps(to_json_safe(report.to_dict()), allow_nan=False, separators=(",", ":"))


def decode_report(data: dict[str, Any]) -> IntervalReport:
    """Inverse of `encode_report` after json.loads: null per-layer values become NaN again."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    missing = [f for f in ("step", "layers", "per_layer") if f not in data]
    if missing:
        raise ValueError(f"not an interval record (missing {', '.join(missing)})")
    _check_shape(data)
    per_layer = [
        {k: (math.nan if v is None else v) for k, v in row.items()} for row in data.get("per_layer", [])
    ]
    return IntervalReport.from_dict({**data, "per_layer": per_layer})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shape(data: dict[str, Any]) -> None:
    """A record's fields have the types and lengths the readers rely on (ValueError otherwise),
    so that a damaged record is one clear error, not a TypeError deep in an analysis."""
    for name in ("step", "steps", "num_experts", "ep_size"):
        if name in data and not _is_int(data[name]):
            raise ValueError(f"{name} is {data[name]!r}, not an integer")
    if "time" in data and not isinstance(data["time"], (int, float)):
        raise ValueError(f"time is {data['time']!r}, not a number")
    layers, per_layer = data["layers"], data["per_layer"]
    if not isinstance(layers, list) or not all(_is_int(n) for n in layers):
        raise ValueError("layers is not a list of layer numbers")
    if not isinstance(per_layer, list) or not all(isinstance(row, dict) for row in per_layer):
        raise ValueError("per_layer is not a list of objects")
    if len(per_layer) != len(layers):
        raise ValueError(f"{len(per_layer)} per_layer rows for {len(layers)} layers")
    for row in per_layer:
        bad = [k for k, v in row.items() if v is not None and not isinstance(v, (int, float))]
        if bad:
            raise ValueError(f"per_layer statistic {bad[0]!r} is not a number")
    for name, depth in (("tokens_per_expert", 2), ("dropped_per_expert", 2), ("rank_matrix", 3)):
        value = data.get(name, [])
        if not _nested_numbers(value, depth):
            raise ValueError(f"{name} is not a {depth}-level list of counts")
    if data.get("tokens_per_expert") and len(data["tokens_per_expert"]) != len(layers):
        raise ValueError(f"tokens_per_expert has {len(data['tokens_per_expert'])} rows for {len(layers)} layers")
    if "meta" in data and not isinstance(data["meta"], dict):
        raise ValueError("meta is not an object")


def _nested_numbers(value: Any, depth: int) -> bool:
    if not isinstance(value, list):
        return False
    if depth == 1:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return all(_nested_numbers(v, depth - 1) for v in value)


def _import_pyarrow() -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet); raises ImportError when pyarrow is not installed.
    One place, so tests can simulate its absence."""
    import pyarrow
    import pyarrow.parquet

    return pyarrow, pyarrow.parquet


def _pyarrow_or_none() -> tuple[Any, Any] | None:
    try:
        return _import_pyarrow()
    except ImportError:
        return None


# ---------------------------------------------------------------------------- writing


def _temp_beside(path: Path) -> Path:
    """A new, empty temp file next to `path` (same filesystem, so os.replace is atomic).
    Created with open(), not mkstemp, so it gets the usual umask permissions, not 0600."""
    for attempt in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{attempt}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temp file next to {path}")


def replace_atomically(path: str | os.PathLike[str], fill: Callable[[Path], Any]) -> None:
    """Write `path` by calling fill(temp_path), fsync, then os.replace: readers see the old
    file or the new one, never a half-written one."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        fill(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `path` whole or not at all (see `replace_atomically`)."""
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _repair_tail(path: Path) -> None:
    """Make `path` end at a record boundary before appending to it.

    A complete record that only lacks its newline gets one; a cut-short fragment
    (the process died mid-write) is truncated away, with a warning."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Find the start of the last line.
        pos, chunk = size, 1 << 16
        start = 0
        while pos > 0:
            read_from = max(0, pos - chunk)
            f.seek(read_from)
            block = f.read(pos - read_from)
            idx = block.rfind(b"\n")
            if idx >= 0:
                start = read_from + idx + 1
                break
            pos = read_from
        f.seek(start)
        fragment = f.read()
        try:
            decode_report(json.loads(fragment))
        except (ValueError, TypeError):
            f.truncate(start)
            log.warning(
                "moe-probe: %s ended in a partial record (%d bytes, left by an interrupted run); removed it",
                path,
                size - start,
            )
        else:
            f.seek(size)
            f.write(b"\n")


def arrays_file_name(step: int) -> str:
    """The run-folder-relative name of the array file of the interval closing at `step`."""
    return f"{ITERATIONS_DIR}/step_{int(step):09d}.npz"


def compact_int_array(values: Any) -> Any:
    """A numpy array of non-negative counts in the smallest unsigned dtype that holds them."""
    import numpy

    a = numpy.asarray(values)
    top = int(a.max()) if a.size else 0
    if a.size and int(a.min()) < 0:
        return a.astype(numpy.int64)
    for dtype in (numpy.uint8, numpy.uint16, numpy.uint32):
        if top <= numpy.iinfo(dtype).max:
            return a.astype(dtype)
    return a.astype(numpy.int64)


def write_arrays(run_dir: str | os.PathLike[str], report: IntervalReport) -> Path | None:
    """The report's integer arrays into its array file (compressed .npz, atomic); None if none."""
    if not report.arrays or not report.arrays_file:
        return None
    import numpy

    target = Path(run_dir) / report.arrays_file
    target.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            numpy.savez_compressed(f, **report.arrays)

    replace_atomically(target, fill)
    return target


def load_arrays(run_dir: str | os.PathLike[str], report: IntervalReport) -> dict[str, Any]:
    """The integer arrays of one record (numpy, int64), or {} when it has no array file or the
    file is missing (a run written by another writer, or a folder copied without it)."""
    if not report.arrays_file:
        return {}
    path = _run_dir(run_dir) / report.arrays_file
    if not path.exists():
        log.warning("moe-probe: %s: array file of the record at step %d is missing", path, report.step)
        return {}
    import numpy

    try:
        with numpy.load(path) as data:
            return {name: data[name].astype(numpy.int64) for name in data.files}
    except (OSError, ValueError) as exc:
        raise CorruptRunError(f"{path}: unreadable array file ({exc})") from exc


def write_meta(run_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """meta.json of a run folder (atomic), with a `store` block naming the format."""
    record = dict(to_json_safe(meta))
    record["store"] = {
        "format": STORE_FORMAT,
        "report_schema": SCHEMA_VERSION,
        "written": time.time(),
        "files": {"meta": META_FILE, "intervals": INTERVALS_FILE, "layers": LAYERS_FILE},
    }
    path = Path(run_dir) / META_FILE
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False, sort_keys=True) + "\n")
    return path


def open_for_append(run_dir: str | os.PathLike[str]) -> IO[str]:
    """intervals.jsonl of a run folder (created with the folder if needed), open for appending
    after any cut-short last record has been removed."""
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / INTERVALS_FILE
    _repair_tail(path)
    return open(path, "a", encoding="utf-8")  # noqa: SIM115 - the caller holds it for the run


def append_report(file: IO[str], report: IntervalReport) -> None:
    """One record, in one write() and flushed to the OS: a kill loses at most this record."""
    line = encode_report(report) + "\n"  # encode first: never a half-encoded line on disk
    file.write(line)
    file.flush()


class LineLog:
    """A JSON-lines file a run writes besides its records (the demo's train.jsonl), as durable
    as they are: each line is one unbuffered write() straight to the OS, so a kill loses at most
    the line being written (readers skip a cut-short last line). A failure to open or write (a
    full or read-only disk) warns once and turns the log off; it never raises into training,
    and `close()` never raises."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.failed: str | None = None
        self._fd: int | None = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as exc:
            self._fail(exc)

    def write(self, data: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = (json.dumps(to_json_safe(data), allow_nan=False) + "\n").encode()
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._fail(exc)

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except OSError:
            pass
        try:
            os.close(fd)
        except OSError:
            pass

    def _fail(self, exc: OSError) -> None:
        self.failed = f"{exc.strerror or exc}"
        log.warning("moe-probe: cannot write %s (%s); training continues without it", self.path, self.failed)
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def write_run(run_dir: str | os.PathLike[str], reports: Iterable[IntervalReport],
              meta: dict[str, Any] | None = None) -> Path:
    """A run folder from reports made elsewhere (tests, converters of other recorders): meta.json
    when `meta` is given, the reports appended to intervals.jsonl, then layers.parquet."""
    folder = Path(run_dir)
    with open_for_append(folder) as f:
        for report in reports:
            write_arrays(folder, report)
            append_report(f, report)
        os.fsync(f.fileno())
    if meta is not None:
        write_meta(folder, meta)
    write_layer_table(folder)
    return folder


# ---------------------------------------------------------------------------- reading


def _intervals_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / INTERVALS_FILE if p.is_dir() else p


def _run_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of a run folder, or {} when there is none."""
    meta_path = _run_dir(path) / META_FILE
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptRunError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CorruptRunError(f"{meta_path}: not a JSON object (a {type(meta).__name__})")
    return meta


def iter_reports(path: str | os.PathLike[str]) -> list[IntervalReport]:
    """Every interval record of intervals.jsonl in file order, without resume handling.

    A last line that cannot be read (cut short by a killed process) is skipped with a
    warning; an unreadable line followed by others raises CorruptRunError."""
    file = _intervals_path(path)
    if not file.exists():
        raise CorruptRunError(f"{file}: no such file; is {_run_dir(path)} a moe-probe run folder?")
    reports: list[IntervalReport] = []
    bad: tuple[int, str] | None = None
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if bad is not None:
                raise CorruptRunError(
                    f"{file}:{bad[0]}: unreadable record in the middle of the file ({bad[1]}); "
                    "only a cut-short last line is tolerated"
                )
            try:
                data = json.loads(raw)
            except ValueError as exc:  # not JSON: cut short by a kill, tolerated as the last line only
                bad = (lineno, f"{type(exc).__name__}: {exc}")
                continue
            if isinstance(data, dict) and data.get("kind", "interval") != "interval":
                continue  # a record kind from a newer writer: not ours to read
            try:
                reports.append(decode_report(data))
            except (ValueError, TypeError) as exc:  # whole JSON but not a record: damaged, wherever it is
                raise CorruptRunError(f"{file}:{lineno}: not a valid interval record ({exc})") from None
    if bad is not None:
        log.warning(
            "moe-probe: %s:%d: skipped a cut-short last record (%s); the run was probably interrupted",
            file,
            bad[0],
            bad[1],
        )
    return reports


def supersede_restarts(reports: Iterable[IntervalReport]) -> list[IntervalReport]:
    """Keep what a resumed run means: a record whose step is not after the previous one
    starts over from there, replacing the earlier records at that step and later."""
    out: list[IntervalReport] = []
    for report in reports:
        if out and report.step <= out[-1].step:
            dropped = 0
            while out and out[-1].step >= report.step:
                out.pop()
                dropped += 1
            log.info(
                "moe-probe: the run restarted at step %d; %d earlier record(s) from that step on are superseded",
                report.step,
                dropped,
            )
        out.append(report)
    return out


def load_run(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[IntervalReport]]:
    """(meta, reports) of a run folder (or of an intervals.jsonl file), with restarts resolved."""
    return load_meta(path), supersede_restarts(iter_reports(path))


def layer_rows(reports: Iterable[IntervalReport]) -> list[dict[str, Any]]:
    """The long layer table: one dict per (step, layer) with step, steps, time, layer and
    every per-layer statistic seen in any report (NaN where a report lacks it)."""
    reports = list(reports)
    seen: set[str] = set()
    for report in reports:
        for row in report.per_layer:
            seen.update(row)
    columns = stat_columns(seen)
    rows: list[dict[str, Any]] = []
    for report in reports:
        for layer, stats in zip(report.layers, report.per_layer):
            row: dict[str, Any] = {"step": int(report.step), "steps": int(report.steps), "time": float(report.time)}
            row["layer"] = int(layer)
            for col in columns:
                value = stats.get(col)
                row[col] = math.nan if value is None else float(value)
            rows.append(row)
    return rows


def stat_columns(names: Iterable[str]) -> list[str]:
    """Statistic names in table order: known ones in KNOWN_STATS order, then the rest sorted."""
    names = set(names) - set(ID_COLUMNS)
    return [n for n in KNOWN_STATS if n in names] + sorted(names - set(KNOWN_STATS))


def write_layer_table(path: str | os.PathLike[str]) -> Path | None:
    """(Re)write layers.parquet from intervals.jsonl. Returns its path, or None when
    pyarrow is not importable or the run has no records yet."""
    pa_pq = _pyarrow_or_none()
    run_dir = _run_dir(path)
    if pa_pq is None:
        log.info("moe-probe: pyarrow is not installed; %s not written (intervals.jsonl has everything)", LAYERS_FILE)
        return None
    pa, pq = pa_pq
    intervals = run_dir / INTERVALS_FILE
    size = intervals.stat().st_size
    rows = layer_rows(supersede_restarts(iter_reports(intervals)))
    if not rows:
        return None
    columns = list(rows[0])
    arrays = []
    for col in columns:
        values = [r[col] for r in rows]
        if col in ("step", "steps", "layer"):
            arrays.append(pa.array(values, type=pa.int64()))
        else:  # NaN (undefined or absent) is stored as null
            arrays.append(pa.array([None if math.isnan(v) else v for v in values], type=pa.float64()))
    table = pa.Table.from_arrays(arrays, names=columns)
    table = table.replace_schema_metadata({_PARQUET_SIZE_KEY: str(size).encode()})
    target = run_dir / LAYERS_FILE
    replace_atomically(target, lambda tmp: pq.write_table(table, os.fspath(tmp)))
    return target


def load_layer_table(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of the layer table as dicts (see `layer_rows`): from layers.parquet when it is
    present, readable and up to date with intervals.jsonl, else derived from the JSONL."""
    run_dir = _run_dir(path)
    parquet = run_dir / LAYERS_FILE
    intervals = run_dir / INTERVALS_FILE
    pa_pq = _pyarrow_or_none() if parquet.exists() else None
    if pa_pq is not None:
        _, pq = pa_pq
        table = pq.read_table(parquet)
        written_for = (table.schema.metadata or {}).get(_PARQUET_SIZE_KEY)
        current = intervals.stat().st_size if intervals.exists() else None
        if current is None or written_for == str(current).encode():
            rows = table.to_pylist()
            for row in rows:
                for key, value in row.items():
                    if value is None and key not in ID_COLUMNS:
                        row[key] = math.nan
            return rows
        log.info("moe-probe: %s is older than %s; reading the JSONL instead", parquet, intervals)
    return layer_rows(load_run(run_dir)[1])
