"""Files written whole or not at all: a temp file beside the target, fsync, os.replace."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temp_beside(path: Path) -> Path:
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
    file or the new one, never a half-written one (a failure removes the temp file)."""
    path = Path(path)
    tmp = temp_beside(path)
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
