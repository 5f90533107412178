"""A wheel install runs every kind of command: build the wheel, install it into a fresh venv
outside the checkout, and run `moe-probe render`, `recommend`, `demo --steps 2` and `analyze`
from there, in a folder outside the checkout.

The venv reuses the project venv's already installed dependencies (torch and megatron-core
are gigabytes) through a .pth line; that folder's own .pth files, among them the editable
install of this checkout, are not processed, so only the wheel provides megatron_moe_probe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.wheel


def _run(cmd, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    assert not tmp.is_relative_to(ROOT)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", ROOT],
         cwd=tmp)
    wheel = next((tmp / "dist").glob("megatron_moe_probe-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip())
    (site / "_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp)
    return venv, tmp


def test_the_wheel_runs_every_kind_of_command(wheel_venv):
    venv, work = wheel_venv
    where = _run([venv / "bin" / "python", "-c", "import megatron_moe_probe; print(megatron_moe_probe.__file__)"],
                 cwd=work).strip()
    assert Path(where).is_relative_to(venv), where  # the wheel, not this checkout
    moe_probe = venv / "bin" / "moe-probe"
    assert "--moe-probe" in _run([moe_probe, "render", "tiny-cpu", "--assume-installed", "none"], cwd=work)
    assert "tiny-gpu:ep4" in _run([moe_probe, "render", "--list"], cwd=work)
    rec = json.loads(_run([moe_probe, "recommend", "--hardware", "H100", "--ep", "8", "--model", "qwen3-30b-a3b",
                           "--assume-installed", "none", "--json"], cwd=work))
    assert rec["flags"][rec["use"]]["megatron_lm"]  # a backend chosen and its flags rendered from the card
    _run([moe_probe, "demo", "--steps", "2", "--interval", "1", "--quiet", "--out", work / "demo"], cwd=work)
    assert (work / "demo" / "intervals.jsonl").is_file()
    result = json.loads(_run([moe_probe, "analyze", work / "demo", "--json"], cwd=work))
    assert result["run"]["intervals"] == 2
