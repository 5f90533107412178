"""Megatron version workarounds and the Megatron interfaces the probe relies on, in one place.

`apply()` installs every quirk that matches the Megatron it runs on (idempotent); each quirk
says which versions need it and why. CPU-only test patches live in cpu/compat.py, not here:
nothing below changes numerics or touches CUDA.

Checked against (CHECKED_AGAINST): megatron-core 0.19.2 (the PyPI wheel) and Megatron-LM main
d98e8a6 (0.20.0, a source checkout; ../shared/vendor), torch 2.11. To refresh for a newer
Megatron: put its `megatron/` snapshot beside the old one, point the test suite's snapshot name
at it (tests/conftest.py, MEGATRON_MAIN_SNAPSHOT) and run `pytest -m megatron_main`:
`check_interfaces()` names every interface below that moved, the counting-contract tests say
whether the counts still hold, and each difference found gets a row in DIFFERENCES.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import warnings
from dataclasses import dataclass

from megatron_moe_probe.versions import megatron_core_version, version_tuple

log = logging.getLogger("megatron_moe_probe")

_APPLIED: list[str] = []

CHECKED_AGAINST = {
    "0.19.2": "megatron-core wheel from PyPI",
    "0.20.0": "Megatron-LM main d98e8a6 (2026-08-22), source checkout",
}


@dataclass(frozen=True)
class Difference:
    """One way Megatron versions differ that the probe meets, and what handles it."""

    name: str
    versions: str  # which Megatron needs the handling
    what: str
    handled_by: str


# Every difference between 0.19.2 (wheel) and main d98e8a6 (checkout) that the probe meets.
# The interfaces themselves (INTERFACES below) are the same in both.
DIFFERENCES = (
    Difference("version_source", "any source checkout (main d98e8a6: 0.20.0)",
               "a checkout has no distribution metadata, or a stale one from a wheel installed "
               "beside it (main on PYTHONPATH over the 0.19.2 wheel reports 0.19.2 through "
               "importlib.metadata)",
               "versions.megatron_core_version() reads megatron/core/package_info.py of the package that "
               "imports, without importing it"),
    Difference("compile_helpers", "0.19.x wheels (not a checkout: main d98e8a6 ships the Makefile "
               "and no compiled helpers)",
               "the wheel ships helpers_cpp compiled but not the Makefile that "
               "_compile_dependencies() runs make on; a checkout has the Makefile and builds the "
               "helpers itself (needs g++ and pybind11)",
               "patch_compile_helpers()"),
    Difference("model_provider_warning", ">= 0.18 (0.19.2 and main d98e8a6 alike)",
               "pretrain_cfg_container_from_args warns on every rank that a ModelConfig is "
               "recommended over a model provider",
               "silence_model_provider_warning()"),
    Difference("rerun_mode_name", "0.19.2 and main d98e8a6 alike",
               "the parser's --rerun-mode choice `report_stats` is not a RerunMode value "
               "(`report_determinism_stats`)",
               "rerun_mode() (the CPU training-loop harness builds the state machine with it)"),
)


# -- which Megatron ---------------------------------------------------------------------------

def megatron_version_text() -> str | None:
    """The version of the Megatron that imports (versions.megatron_core_version)."""
    return megatron_core_version()


def megatron_version() -> tuple[int, ...]:
    text = megatron_version_text()
    return () if text is None else version_tuple(text)[:3]


# -- the interfaces the probe uses ----------------------------------------------------------------

@dataclass(frozen=True)
class Interface:
    """`module:attr.path` must exist (and, for a function, take `params` by these names)."""

    target: str
    params: tuple[str, ...] = ()
    used_by: str = ""


INTERFACES = (
    Interface("megatron.training.training:train_step",
              ("forward_step_func", "data_iterator", "model", "optimizer", "opt_param_scheduler", "config",
               "forward_backward_func"), "training.install wraps it; forward_backward_func is its 4th argument after model"),
    Interface("megatron.training.training:train", (), "training.install wraps it"),
    Interface("megatron.training.training:save_checkpoint_and_time", (), "training.install flushes before it"),
    Interface("megatron.training.arguments:parse_args", ("extra_args_provider",), "flags.add_probe_args"),
    Interface("megatron.training.global_vars:get_tensorboard_writer", (), "the TensorBoard writer is reused"),
    Interface("megatron.core.transformer.moe.moe_layer:MoELayer", (), "hooks find MoE layers by class"),
    Interface("megatron.core.transformer.moe.router:TopKRouter.forward", ("input",), "the router hook reads (probs, routing_map)"),
    Interface("megatron.core.transformer.moe.router:apply_router_token_dropping", (), "the capacity-factor wrapper"),
    Interface("megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher.token_dispatch", (), "timing"),
    Interface("megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher.token_combine", (), "timing"),
    Interface("megatron.core.transformer.moe.token_dispatcher:MoEAllGatherTokenDispatcher.token_dispatch", (), "timing"),
    Interface("megatron.core.transformer.moe.token_dispatcher:MoEFlexTokenDispatcher.token_dispatch", (), "timing"),
    Interface("megatron.core.transformer.cuda_graphs:_CudagraphGlobalRecord.cudagraph_created", (), "graph refusal"),
    Interface("megatron.core.transformer.cuda_graphs:is_graph_warmup", (), "graph warm-up passes are not counted"),
    Interface("megatron.core.full_cuda_graph:FullCudaGraphWrapper.cuda_graph", (), "graph refusal"),
    Interface("megatron.core.rerun_state_machine:RerunMode", (), "rerun_mode()"),
    Interface("megatron.core.datasets.utils:compile_helpers", (), "patch_compile_helpers()"),
)


def check_interfaces(interfaces=INTERFACES) -> list[str]:
    """One line per interface the imported Megatron lacks or changed; [] when all are there."""
    problems = []
    for item in interfaces:
        module_name, _, path = item.target.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for name in path.split("."):
                obj = getattr(obj, name)
        except Exception as exc:  # noqa: BLE001 - a missing module or attribute is the finding
            problems.append(f"{item.target}: missing ({type(exc).__name__}: {exc}) - used by {item.used_by}")
            continue
        if item.params:
            names = list(inspect.signature(obj).parameters)
            if names[:len(item.params)] != list(item.params) and not set(item.params) <= set(names):
                problems.append(f"{item.target}: parameters {names}, expected {list(item.params)} - used by {item.used_by}")
    return problems


def rerun_mode(name: str):
    """Megatron's RerunMode for a --rerun-mode choice: the parser's `report_stats` is the enum's
    `report_determinism_stats` (0.19.2 and main d98e8a6; initialize_megatron passes the parser's
    string through and fails on that mode)."""
    from megatron.core.rerun_state_machine import RerunMode

    values = {m.value for m in RerunMode}
    if name not in values and name == "report_stats" and "report_determinism_stats" in values:
        name = "report_determinism_stats"
    return RerunMode(name)


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
