"""The integer arrays of an interval (per-iteration and per-domain counts): one compressed .npz
per interval under iterations/, written before the record that names it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from megatron_moe_probe.record.atomic import replace_atomically
from megatron_moe_probe.record.problems import CorruptRunError
from megatron_moe_probe.record.reading import run_dir as _run_dir
from megatron_moe_probe.record.report import IntervalReport

log = logging.getLogger("megatron_moe_probe")


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
    except (OSError, ValueError, EOFError) as exc:
        raise CorruptRunError(f"{path}: unreadable array file ({exc})") from None
