"""Runtime proof of the dispatcher: what the live MoE layers actually run, not what the config asked.

"Backend selection in a config is not proof that the requested runtime initialized or
ran" (Megatron-Bridge skill, 2026-07-31; Bridge issue #5992 is a silent fallback to
alltoall). So the probe reads, per MoE layer, the class of the token dispatcher object
Megatron built and, for MoEFlexTokenDispatcher, the class of its `_comm_manager`, the
object that really does the communication. In megatron-core 0.19.2
(transformer/moe/token_dispatcher.py) MoEFlexTokenDispatcher.__init__ picks it from
`config.moe_flex_dispatcher_backend`: _DeepepManager, _HybridEPManager or _NCCLEPManager.
The SM setting is the layer's `config.moe_flex_dispatcher_num_sms` (None means DeepEP's
built-in 20 / HybridEP's library default). Whether the backend's communication buffer
exists (fused_a2a `_buffer` for DeepEP, `_hybrid_ep_buffer` for HybridEP: created on the
first dispatch) says it initialized.

Plain data only, so it can go into the probe's report meta and on disk.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

# Dispatcher class -> backend id (the card's ids); flex resolves through its manager.
DISPATCHER_BACKENDS = {"MoEAlltoAllTokenDispatcher": "alltoall", "MoEAllGatherTokenDispatcher": "allgather"}
FLEX_DISPATCHER = "MoEFlexTokenDispatcher"
FLEX_MANAGERS = {"_DeepepManager": "deepep", "_HybridEPManager": "hybridep", "_NCCLEPManager": "ncclep"}
# fused_a2a module globals that hold the backend's buffer once it has dispatched.
BUFFER_GLOBALS = {"deepep": "_buffer", "hybridep": "_hybrid_ep_buffer"}
FUSED_A2A = "megatron.core.transformer.moe.fused_a2a"


def _buffer_initialized(backend: str | None) -> bool | None:
    name = BUFFER_GLOBALS.get(backend or "")
    mod = sys.modules.get(FUSED_A2A)
    if name is None or mod is None:
        return None
    return getattr(mod, name, None) is not None


def dispatcher_runtime(dispatcher: Any) -> dict[str, Any]:
    """What one live token dispatcher object is: class, backend that runs, flex manager, SMs."""
    cls = type(dispatcher).__name__
    out: dict[str, Any] = {"dispatcher_class": cls, "backend": DISPATCHER_BACKENDS.get(cls), "flex_manager": None,
                           "num_sms": None, "buffer_initialized": None}
    if cls == FLEX_DISPATCHER:
        manager = getattr(dispatcher, "_comm_manager", None)
        mname = type(manager).__name__ if manager is not None else None
        out["flex_manager"] = mname
        out["backend"] = FLEX_MANAGERS.get(mname)
        config = getattr(dispatcher, "config", None)
        out["num_sms"] = getattr(config, "moe_flex_dispatcher_num_sms", None)
        out["buffer_initialized"] = _buffer_initialized(out["backend"])
    return out


def layer_runtime(layers: Iterable[tuple[int, Any]]) -> list[dict[str, Any]]:
    """One record per MoE layer: (1-based layer number, live token dispatcher) -> runtime facts."""
    return [{"layer": int(n), **dispatcher_runtime(d)} for n, d in layers]


# Read back from meta.json and records, without torch: they live with the run description.
from megatron_moe_probe.record.run_meta import backends_that_ran, requested_backend  # noqa: E402,F401
