"""A JSON-lines file a run writes besides its records (the demo's train.jsonl)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from megatron_moe_probe.record.encoding import to_json_safe

log = logging.getLogger("megatron_moe_probe")


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

