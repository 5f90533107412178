"""Reading a run folder back: meta.json through RunMeta, every record through the typed
IntervalRecord, and the supersede rule of resumed runs."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_moe_probe.record.names import INTERVALS_FILE, META_FILE
from megatron_moe_probe.record.problems import CorruptRunError
from megatron_moe_probe.record.report import IntervalReport
from megatron_moe_probe.record.run_meta import MetaError, validate_meta
from megatron_moe_probe.record.schema import decode_report

log = logging.getLogger("megatron_moe_probe")


def intervals_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / INTERVALS_FILE if p.is_dir() else p


def run_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of a run folder, checked against RunMeta (CorruptRunError naming the field),
    or {} when there is none."""
    meta_path = run_dir(path) / META_FILE
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptRunError(f"{meta_path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CorruptRunError(f"{meta_path}: cannot read it ({exc.strerror or exc})") from None
    try:
        validate_meta(meta, str(meta_path))  # its `settings` too (RunMeta.settings is a RunSettings)
    except MetaError as exc:
        raise CorruptRunError(str(exc)) from None
    return meta


def iter_reports(path: str | os.PathLike[str]) -> list[IntervalReport]:
    """Every interval record of intervals.jsonl in file order, without resume handling.

    A last line that cannot be read (cut short by a killed process) is skipped with a
    warning; an unreadable line followed by others raises CorruptRunError."""
    file = intervals_path(path)
    if not file.exists():
        raise CorruptRunError(f"{file}: no such file; is {run_dir(path)} a moe-probe run folder?")
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
    """(meta, reports) of a run folder (or of an intervals.jsonl file), with restarts resolved.
    A folder with records but no meta.json is refused: a run folder is written meta first, so
    one without it was never finished (an interrupted import, a copy that lost it)."""
    folder = Path(path)
    if folder.is_dir() and (folder / INTERVALS_FILE).exists() and not (folder / META_FILE).exists():
        raise CorruptRunError(f"{folder}: records but no {META_FILE}: not a complete run folder "
                              "(an interrupted write or an incomplete copy)")
    return load_meta(path), supersede_restarts(iter_reports(path))
