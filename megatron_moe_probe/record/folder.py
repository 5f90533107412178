"""Run-folder policy: one run per folder, one writer at a time, nothing half-built.

- `claim_run_folder`: a command's --out (the demo): created if missing, refused when it holds
  another run (unless --overwrite) or when another live process writes it; locked first.
- `training_run_folder`: a training run's probe folder (Megatron flags, `moe-probe train`,
  Bridge): a resume appends to its own folder, a fresh run or a busy folder moves to `-2`, ...;
  never raises (the probe must not stop training).
- `new_run_folder`: a folder built whole (`moe-probe import`): written under a temporary name
  beside it and renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record.atomic import temp_beside
from megatron_moe_probe.record.lock import RunFolderBusy, acquire, release_lock
from megatron_moe_probe.record.names import INTERVALS_FILE, LOCK_FILE, META_FILE, RUN_FILES, STORE_FORMAT

log = logging.getLogger("megatron_moe_probe")


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
    """Make `folder` ready to hold one new run and lock it for this command, or refuse with one
    line (UsageError) having changed nothing.

    A folder that does not exist is created. One that has none of the run's files (RUN_FILES
    plus `files`, the names the command itself writes) is used as it is: other files in it are
    left alone. One that holds another run is refused unless `overwrite`, which removes that
    run's files (only those) first. A file of the same name that no run wrote is never touched.
    One that another live process writes is refused, naming it (record/lock.py)."""
    folder = Path(folder)
    files = tuple(files)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_beside(folder / ".write-test")
        probe.unlink()
        acquire(folder)  # before anything is looked at: the check below and the run it admits are one
    except RunFolderBusy:
        raise
    except OSError as exc:
        if created:
            _remove_if_empty(folder)
        raise UsageError(f"cannot write the run folder {folder}: {exc.strerror or exc}") from None
    try:
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
                    shutil.rmtree(target)
                else:
                    target.unlink()
            log.info("moe-probe: removed the earlier run in %s (--overwrite)", folder)
    except BaseException:
        release_lock(folder)
        if created:
            _remove_if_empty(folder)
        raise
    return folder


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


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
    """The folder a training run's probe writes to (Megatron flags, `moe-probe train`), locked
    for this process (the local writer's close releases it).

    A run resumed from a checkpoint (Megatron's iteration > 0) appends to its own folder, where
    its later records supersede those past the resumed iteration. A fresh run never writes into
    a folder that holds another run (or files of that name), and no run writes into a folder
    another live process writes (a relaunch while the old job still runs): it takes `<folder>-2`,
    `-3`, ... and says so once. Never raises for that (the probe must not stop training)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        acquire(folder)  # first: a live writer there is named, whatever the folder holds
    except RunFolderBusy as exc:
        fresh = _fresh_locked(folder)
        log.warning("moe-probe: %s; writing this run to %s instead", exc, fresh)
        return fresh
    if (resumed and holds_run(folder)) or not _taken(folder, ()):
        return folder
    release_lock(folder)
    fresh = _fresh_locked(folder)
    log.warning("moe-probe: %s already holds another run (this one starts at iteration 0, not resumed); "
                "writing this run to %s instead", folder, fresh)
    return fresh


def _fresh_locked(folder: Path) -> Path:
    """A new `<folder>-N`, locked (made here, so no one else holds it; if one raced us to it, the next)."""
    for _ in range(100):
        fresh = fresh_run_folder(folder)
        try:
            acquire(fresh)
            return fresh
        except RunFolderBusy:
            continue
    return fresh_run_folder(folder)


@contextlib.contextmanager
def new_run_folder(folder: str | os.PathLike[str], flag: str = "--out") -> Iterator[Path]:
    """Build a run folder whole: yields a temporary folder beside `folder` to write into, renamed
    to `folder` only when the block ends without an error (else removed). `folder` must not exist
    or be empty; a second builder racing for the same name loses at the rename, with one line."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "already holds a run" if holds_run(folder) else "exists and is not empty"
        raise UsageError(f"{flag} {folder} {what}; choose a new {flag} (nothing was changed)")
    parent = folder.parent if str(folder.parent) else Path(".")
    missing = [p for p in (parent, *parent.parents) if not p.exists()]  # made here, removed on failure
    tmp = parent / f".{folder.name}.{os.getpid()}.partial"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        _remove_made(missing)
        raise UsageError(f"cannot write the run folder {folder}: {exc.strerror or exc}") from None
    try:
        yield tmp
        (tmp / LOCK_FILE).unlink(missing_ok=True)
        try:
            os.rename(tmp, folder)  # atomic; replaces only an empty folder
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise UsageError(f"{flag} {folder} was filled by another process meanwhile; choose a new {flag} "
                             f"(nothing was changed)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(missing)
        raise


def _remove_made(folders: list[Path]) -> None:
    for made in folders:  # deepest first
        _remove_if_empty(made)
