"""The layer table: one row per (step, layer), every per-layer statistic a column, as
layers.parquet when pyarrow is importable (derived from intervals.jsonl, which has everything)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_moe_probe.record.atomic import replace_atomically
from megatron_moe_probe.record.names import ID_COLUMNS, INTERVALS_FILE, KNOWN_STATS, LAYERS_FILE
from megatron_moe_probe.record.reading import iter_reports, load_run, run_dir as _run_dir, supersede_restarts
from megatron_moe_probe.record.report import IntervalReport

log = logging.getLogger("megatron_moe_probe")

_PARQUET_SIZE_KEY = b"megatron_moe_probe.intervals_bytes"


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
        pa, pq = pa_pq
        try:
            table = pq.read_table(parquet)
        except (OSError, pa.ArrowException) as exc:  # a damaged table: intervals.jsonl has everything
            log.warning("moe-probe: %s is unreadable (%s); reading the JSONL instead", parquet, exc)
            return layer_rows(load_run(run_dir)[1])
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
