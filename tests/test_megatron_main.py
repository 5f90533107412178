"""The counting contract on Megatron-LM main as well as on the 0.19 wheel.

The same checks as tests/test_train_loop.py (Megatron's own `train()` -> `train_step` on CPU)
and tests/test_probe_megatron.py (the probe against the dispatchers' own splits) run in a
subprocess whose PYTHONPATH puts the Megatron-LM main snapshot (conftest.MEGATRON_MAIN_SNAPSHOT)
before the installed wheel. A subset keeps CI time small: the fresh run with evaluation, a
resume, a rerun, the all-gather dispatcher through the loop; alltoall and allgather against the
dispatchers' splits, capacity dropping and recomputation. `pytest -m megatron_main` runs only these.
"""

import os
import subprocess
import sys

import pytest

from conftest import MEGATRON_MAIN_VERSION


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONTRACT = [
    "tests/test_train_loop.py::test_fresh_run_with_evaluation_counts_every_trained_iteration_once",
    "tests/test_train_loop.py::test_resumed_run_counts_from_the_resumed_iteration",
    "tests/test_train_loop.py::test_rerun_forward_backward_is_counted_once",
    "tests/test_train_loop.py::test_other_dispatcher_through_the_loop",
    "tests/test_probe_megatron.py::test_alltoall_ep2_counts_and_matrix_match_dispatcher",
    "tests/test_probe_megatron.py::test_allgather_dispatcher_counts_match_gathered_map",
    "tests/test_probe_megatron.py::test_capacity_dropping_counts_kept_and_dropped_not_padding",
    "tests/test_probe_megatron.py::test_recomputation_does_not_double_count",
]


def _env(snapshot):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([snapshot, REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NO_VCS_VERSION"] = "1"  # package_info would run git in the snapshot folder
    return env


def _python(snapshot, code):
    out = subprocess.run([sys.executable, "-c", code], env=_env(snapshot), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_every_interface_is_there_on_the_installed_megatron():
    pytest.importorskip("megatron.training")
    from megatron_moe_probe.megatron import quirks

    assert quirks.check_interfaces() == []
    assert quirks.megatron_version_text() in quirks.CHECKED_AGAINST
    # A moved interface is named, with what uses it.
    moved = quirks.check_interfaces([quirks.Interface("megatron.training.training:no_such_step", (), "a test")])
    assert len(moved) == 1 and "no_such_step" in moved[0] and "a test" in moved[0]
    assert all(d.versions and d.handled_by for d in quirks.DIFFERENCES)


@pytest.mark.megatron_main
def test_snapshot_is_what_imports_and_every_interface_is_there(megatron_main):
    lines = _python(megatron_main, "\n".join([
        "import megatron.core, megatron.training",
        "from megatron_moe_probe.megatron import quirks",
        "from megatron_moe_probe.writers.meta import versions",
        "print(megatron.core.__file__); print(megatron.training.__file__)",
        "print(quirks.megatron_version_text()); print(versions()['megatron-core'])",
        "print(quirks.check_interfaces() or 'all interfaces present')",
    ]))
    core, training, version, recorded, interfaces = lines[-5:]
    assert core.startswith(megatron_main) and training.startswith(megatron_main)
    # The version the quirks and the run records see is the snapshot's, not the wheel's beside it.
    assert version == recorded == MEGATRON_MAIN_VERSION
    assert version in __import__("megatron_moe_probe.megatron.quirks", fromlist=["x"]).CHECKED_AGAINST
    assert interfaces == "all interfaces present", interfaces


@pytest.mark.megatron_main
def test_counting_contract_holds_on_megatron_main(megatron_main):
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CONTRACT],
                         cwd=REPO, env=_env(megatron_main), capture_output=True, text=True, timeout=900)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"{len(CONTRACT)} passed" in summary, summary
