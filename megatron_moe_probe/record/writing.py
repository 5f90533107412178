"""Writing a run folder: meta.json (from the typed RunMeta, atomic), intervals.jsonl (one record
per write(), flushed at once, so a killed process loses at most the record being written), and
whole folders from reports made elsewhere (`write_run`)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from megatron_moe_probe.record.arrays import write_arrays
from megatron_moe_probe.record.atomic import atomic_write_text
from megatron_moe_probe.record.encoding import to_json_safe
from megatron_moe_probe.record.names import INTERVALS_FILE, LAYERS_FILE, META_FILE, SCHEMA_VERSION, STORE_FORMAT
from megatron_moe_probe.record.report import IntervalReport
from megatron_moe_probe.record.run_meta import MetaError, validate_meta, with_settings
from megatron_moe_probe.record.schema import decode_report

log = logging.getLogger("megatron_moe_probe")


def encode_report(report: IntervalReport) -> str:
    """One line of intervals.jsonl (without the newline): strict JSON, NaN as null."""
    return json.dumps(to_json_safe(report.to_dict()), allow_nan=False, separators=(",", ":"))


def meta_record(meta: dict[str, Any]) -> dict[str, Any]:
    """What meta.json holds for `meta`: its typed settings filled in (RunMeta), a `store` block
    naming the format, plain JSON."""
    record = dict(to_json_safe(meta))
    try:
        record = with_settings(record)
        record = validate_meta(record).model_dump(mode="json", exclude_unset=True)
    except MetaError as exc:  # a writer must not stop a run: write it as given, readers name the field
        log.warning("moe-probe: run metadata does not match RunMeta (%s); written as given", exc)
    record["store"] = {
        "format": STORE_FORMAT,
        "report_schema": SCHEMA_VERSION,
        "written": time.time(),
        "files": {"meta": META_FILE, "intervals": INTERVALS_FILE, "layers": LAYERS_FILE},
    }
    return record


def write_meta(run_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """meta.json of a run folder (atomic), from the typed run description (`meta_record`)."""
    path = Path(run_dir) / META_FILE
    atomic_write_text(path, json.dumps(meta_record(meta), indent=2, allow_nan=False, sort_keys=True) + "\n")
    return path


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


def write_run(run_dir: str | os.PathLike[str], reports: Iterable[IntervalReport],
              meta: dict[str, Any] | None = None) -> Path:
    """A run folder from reports made elsewhere (tests, converters of other recorders): meta.json
    (when `meta` is given or the folder has none), the reports appended to intervals.jsonl, then layers.parquet.
    (`folder.new_run_folder` makes it appear whole.)"""
    from megatron_moe_probe.record.table import write_layer_table

    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if meta is not None or not (folder / META_FILE).exists():
        write_meta(folder, meta or {})  # first: a folder with records but no meta.json is refused
    with open_for_append(folder) as f:
        for report in reports:
            write_arrays(folder, report)
            append_report(f, report)
        os.fsync(f.fileno())
    write_layer_table(folder)
    return folder
