"""Shared by the tests: the `moe-probe` command line as a subprocess and in process, the checks
every mistake must pass (exit 2, one stderr line, nothing changed, no process left), and small
run folders built from hand-made records (no training).

    from helpers import cli, assert_one_line_error, tree_state, make_report, fake_run
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
H200_RUNS = (DATA / "h200_run_mock", DATA / "h200_run_text")
CLI = [sys.executable, "-m", "megatron_moe_probe.cli"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


# ---------------------------------------------------------------------------- the command line

def cli(*argv, cwd=None, timeout=120, env=None, **kw) -> subprocess.CompletedProcess:
    """`moe-probe ARGV...` in a subprocess of this checkout (text output captured)."""
    return subprocess.run([*CLI, *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**ENV, **(env or {})}, **kw)


def cli_popen(*argv, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, argv)], env={**ENV, **(env or {})}, **kw)


def cli_in_process(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `moe-probe ARGV...` run in this process (fast; no subprocess)."""
    from megatron_moe_probe.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's --help
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The mistake contract: exit `code`, exactly one stderr line naming the command, no traceback."""
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moe-probe"), lines[0]
    assert "internal error" not in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- folders and processes

def tree_state(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` with a hash of its bytes: what must not change."""
    return {str(p.relative_to(folder)) + ("/" if p.is_dir() else ""):
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(folder.rglob("*"))}


def children() -> set[int]:
    """Live processes below this test process (Linux /proc)."""
    from megatron_moe_probe.lifetime import descendants

    return set(descendants(os.getpid()))


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
        except OSError:
            pass
    return out


def wait_gone(pids, seconds=15.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


# ---------------------------------------------------------------------------- records and runs

def make_report(step: int, layers=(1, 2), experts: int = 4, ep: int = 2, steps: int | None = None):
    """A small, self-consistent IntervalReport (counts 10, 20, ... per layer; an even rank matrix)."""
    from megatron_moe_probe.record import IntervalReport

    tokens = [[10 * (e + 1) for e in range(experts)] for _ in layers]
    per_layer = [{"tokens": float(sum(t)), "max_over_mean": 1.6, "gini": 0.25} for t in tokens]
    rank = [[[5] * ep for _ in range(ep)] for _ in layers]
    return IntervalReport(step=step, steps=step if steps is None else steps, time=1.0, layers=list(layers),
                          num_experts=experts, ep_size=ep, per_layer=per_layer, tokens_per_expert=tokens,
                          rank_matrix=rank)


def fake_run(folder: Path, step: int = 4, reports=None, **meta) -> Path:
    """A run folder as the demo would leave it, without training: meta.json + records."""
    from megatron_moe_probe import record

    record.write_run(folder, reports if reports is not None else [make_report(step)],
                     {"job": "demo", "dispatcher": "allgather", "data": "text", **meta})
    return folder
