"""Megatron version workarounds the launcher needs, in one place.

`apply()` installs every quirk that matches the installed megatron-core (idempotent);
each quirk says which versions need it and why. CPU-only test patches live in
cpu_compat.py, not here: nothing below changes numerics or touches CUDA.

Checked against megatron-core 0.19.2 (the PyPI wheel), torch 2.11.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

from megatron_moe_probe.versions import installed_version, version_tuple

log = logging.getLogger("megatron_moe_probe")

_APPLIED: list[str] = []


def megatron_version() -> tuple[int, ...]:
    text = installed_version("megatron-core")
    return () if text is None else version_tuple(text)[:3]


# -- quirk 1: compile_helpers -------------------------------------------------------------------

def _helpers_state() -> tuple[bool, bool, str]:
    """(has_makefile, has_compiled_helpers, datasets_dir) for megatron.core.datasets."""
    spec = importlib.util.find_spec("megatron.core.datasets")
    folder = os.path.dirname(spec.origin) if spec and spec.origin else ""
    has_makefile = bool(folder) and os.path.isfile(os.path.join(folder, "Makefile"))
    has_compiled = importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None
    return has_makefile, has_compiled, folder


def patch_compile_helpers() -> bool:
    """megatron-core wheels (seen on 0.19.x; source checkouts are fine): `initialize_megatron()`
    -> `_compile_dependencies()` calls `megatron.core.datasets.utils.compile_helpers()`, which
    runs `make -C megatron/core/datasets`. The wheel ships the compiled extension
    (`helpers_cpp.*.so`) but not the Makefile, so `make` fails and Megatron calls `sys.exit(1)`.
    When the extension is there and the Makefile is not, compile_helpers becomes a no-op.
    `_compile_dependencies` imports the function from the module at call time, so rebinding the
    module attribute is enough.

    Returns True when patched. Raises RuntimeError when neither the Makefile nor the compiled
    extension exists (GPTDataset / BlendedDataset index building could not work at all).
    """
    from megatron.core.datasets import utils as ds_utils

    if getattr(ds_utils.compile_helpers, "_moe_probe_noop", False):
        return True
    has_makefile, has_compiled, folder = _helpers_state()
    if has_makefile:
        return False  # a source checkout: let Megatron build its helpers as usual
    if not has_compiled:
        raise RuntimeError(
            f"megatron-core at {folder} has neither the dataset helpers' Makefile nor the compiled "
            "helpers_cpp extension; GPTDataset cannot build its indices. Reinstall megatron-core."
        )

    def compile_helpers() -> None:
        """No-op (moe-probe quirk): the wheel ships helpers_cpp already compiled."""

    compile_helpers._moe_probe_noop = True
    ds_utils.compile_helpers = compile_helpers
    return True


# -- quirk 2: the config-container warning -------------------------------------------------------

def silence_model_provider_warning() -> None:
    """megatron-core 0.18+: `pretrain_cfg_container_from_args(args)` without a `model_cfg` warns
    on every rank that a ModelConfig is "recommended" over a model provider function. A model
    provider is still a supported path in 0.19 (`setup_model_and_optimizer` falls back to
    `get_model(model_provider_func, ...)` when `cfg_container.model` is None), so the warning is
    noise in every worker's log."""
    warnings.filterwarnings("ignore", message=r"\s*It is recommended to use a ModelConfig")


# -- all of them --------------------------------------------------------------------------------

def apply() -> list[str]:
    """Install every quirk the installed Megatron needs (idempotent); return their names."""
    if _APPLIED:
        return list(_APPLIED)
    version = megatron_version()
    if version and version[:2] < (0, 18):
        log.warning("moe-probe: megatron-core %s is older than the 0.18/0.19 this launcher was written for",
                    ".".join(map(str, version)))
    if patch_compile_helpers():
        _APPLIED.append("compile_helpers")
    silence_model_provider_warning()
    _APPLIED.append("model_provider_warning")
    return list(_APPLIED)
