"""No child of a `moe-probe` command outlives it, whatever signal it dies of.

Two mechanisms, one per kind of child:

- A child we start with Python's multiprocessing (the demo's ranks) calls
  `die_with_parent(parent_pid)` first thing: Linux delivers SIGKILL to it the moment its parent
  dies (prctl PR_SET_PDEATHSIG), even of SIGKILL; elsewhere a thread polls os.getppid().
- A command line we start (torchrun under `moe-probe train`, a cell of `moe-probe matrix`) runs
  under a guard: `subprocess.Popen(guarded(cmd))` starts `python -m megatron_moe_probe.lifetime`,
  which starts `cmd` in a process group of its own and becomes the child subreaper of everything
  below it (PR_SET_CHILD_SUBREAPER), so even processes that start their own sessions (torchrun's
  workers do) stay its descendants. The guard stops the command when its own parent dies
  (PDEATHSIG, or the poll) or when it is sent SIGTERM/SIGHUP/SIGINT: the signal is forwarded
  once, and whatever is still running `GRACE_S` seconds later is SIGKILLed. When the command
  exits by itself, descendants it left behind are stopped the same way. The guard exits with
  the command's exit code (128 + N for signal N).

Standard library only: the guard starts in milliseconds and imports neither torch nor Megatron.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

GRACE_S = 3.0  # from SIGTERM to SIGKILL, twice at most: well below `moe-probe matrix`'s own grace (15 s)
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, on_death) -> None:
    """Call on_death() (from a daemon thread) once `parent_pid` is no longer our parent."""

    def poll():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        on_death()

    threading.Thread(target=poll, name="moe-probe-parent-watch", daemon=True).start()


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Make this process receive `sig` when its parent (`parent_pid`, passed down by the parent:
    it may already be gone) dies. Call it first thing in the child."""
    _prctl(_PR_SET_PDEATHSIG, int(sig))
    # The parent may have died before prctl ran; and prctl is Linux only: poll as well.
    _watch_parent(parent_pid, lambda: os.kill(os.getpid(), sig))


def guarded(cmd: list[str]) -> list[str]:
    """`cmd` run under the guard (see module docstring); start it with subprocess.Popen."""
    return [sys.executable, "-m", "megatron_moe_probe.lifetime", "--parent", str(os.getpid()), "--", *cmd]


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and fields[0] != b"Z":
            out.setdefault(int(fields[1]), []).append(int(name))
    return out


def descendants(pid: int) -> list[int]:
    """Live processes below `pid` (Linux /proc; [] elsewhere)."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_all_below(grace: float = GRACE_S, first: int = signal.SIGTERM) -> None:
    """Signal every descendant of this process, then SIGKILL what is left after `grace` s."""
    me = os.getpid()
    for pid in descendants(me):
        try:
            os.kill(pid, first)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not descendants(me):
            return
        time.sleep(0.05)
    for pid in descendants(me):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while descendants(me) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)
    _reap()


def _guard(parent_pid: int, cmd: list[str]) -> int:
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, on_signal)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    _watch_parent(parent_pid, lambda: (received.append(signal.SIGTERM), stop.set()))
    if os.getppid() != parent_pid:
        return 128 + signal.SIGTERM
    try:
        proc = subprocess.Popen(cmd, process_group=0)  # its own group: a signal reaches it once, from us
    except OSError as exc:
        print(f"moe-probe: cannot start {cmd[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    while proc.poll() is None and not stop.is_set():
        stop.wait(0.1)
    if stop.is_set() and proc.poll() is None:
        try:
            os.kill(proc.pid, received[0] if received else signal.SIGTERM)
        except OSError:
            pass
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            stop_all_below(grace=0.5, first=signal.SIGKILL)  # it did not stop in time: all of it, now
    stop_all_below()  # what the command left behind
    code = proc.wait()
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 4 or argv[0] != "--parent" or argv[2] != "--":
        print("usage: python -m megatron_moe_probe.lifetime --parent PID -- COMMAND...", file=sys.stderr)
        return 2
    return _guard(int(argv[1]), argv[3:])


if __name__ == "__main__":
    sys.exit(main())
