"""The local writer: every IntervalReport of a run into its run folder (record/ has the format).

It is the folder's one writer: opening it takes the folder's lock (record/lock.py; a second
live writer is refused naming the holder, one the command or `training_run_folder` already
took is shared), closing it releases the lock.

fsync is done at close only: an fsync per interval costs milliseconds to seconds on the
network filesystems training clusters use, and it only adds protection against the whole
machine going down, where the kernel would lose the last few seconds of dirty pages at most.
A resumed run (same folder, restarted from a checkpoint) appends; readers let the records
after the restart supersede the earlier ones (record.supersede_restarts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megatron_moe_probe import record
from megatron_moe_probe.record import IntervalReport


class LocalWriter:
    """Writes a run folder (see record/)."""

    name = "local"

    def __init__(self, out_dir: str | os.PathLike[str], *, parquet_every: int = 0) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        record.lock_run_folder(self.dir)  # before the first byte (RunFolderBusy when another run writes it)
        try:
            if not (self.dir / record.META_FILE).exists():
                record.write_meta(self.dir, {})  # meta first: readers refuse records without meta.json
            self._file = record.open_for_append(self.dir)
        except BaseException:
            record.release_lock(self.dir)
            raise
        self.intervals_path = self.dir / record.INTERVALS_FILE
        self.parquet_every = parquet_every
        self._count = 0

    def write_meta(self, meta: dict[str, Any]) -> None:
        record.write_meta(self.dir, meta)

    def write(self, report: IntervalReport) -> None:
        if self._file is None:
            raise RuntimeError("the local writer is closed")
        record.write_arrays(self.dir, report)  # before the record that points to it
        record.append_report(self._file, report)
        self._count += 1
        if self.parquet_every and self._count % self.parquet_every == 0:
            record.write_layer_table(self.dir)

    def close(self) -> None:
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            try:
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
            record.write_layer_table(self.dir)
        finally:
            record.release_lock(self.dir)
