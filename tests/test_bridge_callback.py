"""The probe's Megatron-Bridge callback against Bridge 0.6.2's real CallbackManager and
CallbackContext (its callbacks.py, loaded by path from the wheel: `import megatron.bridge` would
pull in transformers and the model zoo), on the real CPU Megatron MoE."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bridge_jobs
from megatron_moe_probe.cpu.cluster import TinyMoEConfig, run_ranks
from megatron_moe_probe.record import load_run

BRIDGE = "megatron-bridge==0.6.2"
CFG = TinyMoEConfig()
WORLD, ITERS, MICRO, INTERVAL, EVAL_EVERY, SAVE_EVERY = 2, 8, 2, 4, 2, 3


@pytest.fixture(scope="session")
def bridge_callbacks_py():
    """callbacks.py of the Megatron-Bridge 0.6.2 wheel, downloaded once into a cache folder."""
    cache = Path(os.environ.get("MOE_PROBE_TEST_CACHE", Path.home() / ".cache" / "megatron_moe_probe")) / "bridge-0.6.2"
    target = cache / "callbacks.py"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        wheels = list(cache.glob("megatron_bridge-0.6.2-*.whl"))
        if not wheels:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", BRIDGE, "-d", str(cache)],
                                  capture_output=True, text=True, timeout=300)
            wheels = list(cache.glob("megatron_bridge-0.6.2-*.whl"))
            if not wheels:
                pytest.skip(f"cannot download {BRIDGE} (offline?): {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            target.write_bytes(wheel.read("megatron/bridge/training/callbacks.py"))
    return str(target)


def test_bridge_callback_counts_exactly_through_bridges_callback_manager(tmp_path, bridge_callbacks_py):
    out = str(tmp_path / "probe")
    results = run_ranks(bridge_jobs.bridge_loop, WORLD, CFG, bridge_callbacks_py, out, ITERS, MICRO, INTERVAL,
                        EVAL_EVERY, SAVE_EVERY)
    # Bridge's manager registered exactly the events the callback overrides.
    assert results[0]["eval_passes"] == ITERS // EVAL_EVERY
    assert all(r["broken_session"] is None for r in results)  # attach failed inside, training went on
    meta, reports = load_run(out)
    assert meta["framework"] == "megatron-bridge" and meta["args"]["moe_router_topk"] == CFG.topk
    # Flushes: every INTERVAL iterations and at every checkpoint save (3, 6), iterations 1-based.
    assert [(r.step, r.steps) for r in reports] == [(3, 3), (4, 1), (6, 2), (8, 2)]
    tokens = CFG.micro_batch_size * CFG.seq_length * MICRO * WORLD  # routed per iteration, all ranks
    for r in reports:
        assert r.layers == [1, 2]
        for row, counts in zip(r.per_layer, r.tokens_per_expert):
            # The counting contract: evaluation passes (after iterations 2, 4, 6, 8) are not counted.
            assert sum(counts) == r.steps * tokens * CFG.topk == row["tokens"]
    assert not Path(out + "-broken").exists()  # the failed callback left nothing behind


def test_bridge_callback_imports_no_bridge_and_rejects_bad_writers():
    from megatron_moe_probe.errors import UsageError
    from megatron_moe_probe.megatron.bridge import MoEProbeCallback

    with pytest.raises(UsageError):
        MoEProbeCallback(writers="local,nope")
    code = "import sys, megatron_moe_probe.megatron.bridge as b; b.MoEProbeCallback(); print('megatron.bridge' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.strip() == "False", proc.stderr


def test_render_bridge_prints_the_callback_lines():
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_probe.cli", "render", "tiny-gpu", "--format", "bridge",
                           "--assume-installed", "none"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = lines.index("from megatron_moe_probe.megatron.bridge import MoEProbeCallback")
    code = "\n".join(lines[start:start + 2])
    namespace = {}
    exec(code, namespace)  # the printed lines are Python that builds the callback
    probe = namespace["probe"]
    assert probe.interval == 10 and probe.writer_names == ["local", "console"] and probe.timing is True
