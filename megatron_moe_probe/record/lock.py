"""One writer per run folder, between processes: a lock file held for the writer's lifetime.

`FOLDER/.moe-probe.lock` names its holder (pid, host, command, start time) and is held with an
exclusive `flock` on it, taken before the first byte of a run is written. The kernel drops the
flock when the holder dies however it dies, so a lock left by a killed writer never blocks the
next one: it is taken over and named once (a warning). A second live writer is refused with a
line naming the holder (`RunFolderBusy`, exit 2 in the CLI).

The lock belongs to the command: a process whose ancestor holds the folder's lock (the demo's
writing rank under `moe-probe demo`, a torchrun worker under a `moe-probe train` that locked it)
writes under it. Within one process, taking it again is counted, not refused; the lock file is
removed when the last user releases it, or at exit.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record.names import LOCK_FILE

log = logging.getLogger("megatron_moe_probe")

try:
    import fcntl
except ImportError:  # not POSIX: the O_EXCL file alone (a killed writer's lock is then taken over by pid)
    fcntl = None  # type: ignore[assignment]


class RunFolderBusy(UsageError):
    """Another live process writes this run folder."""


def _holder_text(info: dict) -> str:
    started = info.get("started")
    when = time.strftime(" since %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{when}"


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    for _ in range(64):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rfind(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 1:
            break
        out.add(pid)
    if not out:
        out.add(os.getppid())
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


class FolderLock:
    def __init__(self, folder: Path, fd: int | None, inherited: bool) -> None:
        self.folder, self.path = folder, folder / LOCK_FILE
        self._fd, self.inherited, self.users = fd, inherited, 0

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink()  # while still holding it: the next writer finds no file or a new one
        except OSError:
            pass
        try:
            os.close(fd)
        except OSError:
            pass


_held: dict[Path, FolderLock] = {}


def _key(folder: Path) -> Path:
    return Path(os.path.realpath(folder))


def _try_take(folder: Path) -> tuple[int | None, dict]:
    """(fd holding the lock, {}) or (None, the holder's description)."""
    path = folder / LOCK_FILE
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # This filesystem has no flock (ENOLCK, EINVAL): write unlocked rather than not at all.
                    log.warning("moe-probe: %s: cannot lock the run folder (%s); one writer per folder is "
                                "not enforced here", folder, exc.strerror or exc)
                    return fd, {}
                os.close(fd)
                info = _read(path)
                if not info:  # taken a moment ago, its holder not written yet
                    time.sleep(0.05)
                    info = _read(path)
                return None, info or {"pid": "?", "host": "?"}
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (removed) it between our open and our flock: again
                os.close(fd)
                continue
        return fd, {}
    raise RunFolderBusy(f"{folder}: cannot take the run folder's lock {path} (it keeps changing hands)")


def acquire(folder: str | os.PathLike[str]) -> FolderLock:
    """The writer's lock of `folder` (which must exist), held by this process (or an ancestor)
    from now until `release_lock` or exit. Raises RunFolderBusy naming the live holder."""
    folder = Path(folder)
    key = _key(folder)
    held = _held.get(key)
    if held is not None:
        held.users += 1
        return held
    fd, holder = _try_take(folder)
    if fd is None:
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid in _ancestors():
            lock = FolderLock(folder, None, inherited=True)  # our command holds it for us
        else:
            raise RunFolderBusy(f"{folder} is being written by another run ({_holder_text(holder)}: "
                                f"{' '.join(holder.get('command') or [])[:80]}); wait for it to end or choose "
                                f"another folder")
    else:
        previous = _read(folder / LOCK_FILE)
        if previous.get("pid") not in (None, os.getpid()):
            log.warning("moe-probe: %s: took over the lock left by %s, which is gone", folder, _holder_text(previous))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": list(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        lock = FolderLock(folder, fd, inherited=False)
    lock.users = 1
    _held[key] = lock
    return lock


def release_lock(folder: str | os.PathLike[str]) -> None:
    """One user of this process's lock of `folder` is done; the last one removes the lock file."""
    key = _key(Path(folder))
    lock = _held.get(key)
    if lock is None:
        return
    lock.users -= 1
    if lock.users <= 0:
        del _held[key]
        lock.release()


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        _held.pop(key).release()
