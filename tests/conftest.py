import os
import sys

import pytest

# Rank functions for spawned processes live in tests/megatron_jobs.py; spawn re-imports them by name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    assert wandb.run is None
    yield wandb
    if wandb.run is not None:
        wandb.run.finish()


# -- Megatron-LM main: the same counting-contract checks against a source snapshot ------------------
# The snapshot CI uses: Megatron-LM's `megatron/` package at one main commit, in ../shared/vendor
# (read-only there). To move to a newer main, put its tarball there and change this name.
MEGATRON_MAIN_SNAPSHOT = "megatron-lm-main-d98e8a6"
MEGATRON_MAIN_VERSION = "0.20.0"  # its megatron/core/package_info.py


def _snapshot_tarball():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shared = os.environ.get("MOE_PROBE_SHARED") or os.path.join(os.path.dirname(repo), "shared")
    return os.path.join(shared, "vendor", MEGATRON_MAIN_SNAPSHOT + ".tar.gz")


@pytest.fixture(scope="session")
def megatron_main():
    """The folder holding the snapshot's `megatron/` package, unpacked once into a cache folder
    outside the repository (../shared is read-only). Skips when ../shared is absent."""
    import hashlib
    import tarfile
    import tempfile

    tarball = _snapshot_tarball()
    if not os.path.isfile(tarball):
        pytest.skip(f"Megatron-LM main snapshot not found: {tarball} (../shared/vendor is absent here; "
                    "CI has it beside the repository)")
    digest = hashlib.sha256(open(tarball, "rb").read()).hexdigest()[:12]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "megatron_moe_probe")
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError:  # no writable home: the system's temporary folder
        cache = os.path.join(tempfile.gettempdir(), "megatron_moe_probe_cache")
    target = os.path.join(cache, f"{MEGATRON_MAIN_SNAPSHOT}-{digest}")
    if not os.path.isdir(os.path.join(target, "megatron", "core")):
        os.makedirs(cache, exist_ok=True)
        staging = tempfile.mkdtemp(dir=cache, prefix=".unpack-")
        with tarfile.open(tarball) as tar:
            tar.extractall(staging, filter="data")
        (top,) = os.listdir(staging)  # the tarball holds one folder: megatron-lm-main/{megatron,LICENSE}
        try:
            os.rename(os.path.join(staging, top), target)  # atomic: a parallel session sees all or nothing
        except OSError:
            if not os.path.isdir(os.path.join(target, "megatron", "core")):
                raise
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target
