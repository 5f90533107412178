"""The adapter between Megatron-Core 0.19 MoE layers and the probe's session.

Everything that touches Megatron internals for counting lives here:
- a forward hook on every MoE layer's router (`TopKRouter.forward` returns
  `(probs, routing_map)` for every dispatcher: allgather, alltoall, flex);
- with a capacity factor, a wrapper around `router.apply_router_token_dropping`
  (module global in megatron.core.transformer.moe.router) that sees the routing
  map before and after dropping, so dropped tokens are counted and padding is not;
- layer numbers (global, 1-based, from `router.layer_number`; MTP layers after the
  decoder's layers), EP rank/size and node locality from the dispatcher's groups.

What is counted (the counting contract, docs/metrics.md): router calls of training
forward passes, as the session's CountingGate decides (session.py). A training loop
that tells the session where its iterations are (`start_step` / `after_step`, as
install() does around Megatron's `train_step`) gets nothing else: no evaluation, no
CUDA-graph warm-up pass, no call between iterations. Activation recomputation is never
counted. Under CUDA-graph capture the hook's kernel is captured (it adds into a fixed
buffer, see accumulator.py), so each replay counts the pass it runs and the capture
itself counts nothing.

The hook body is the launch floor: one attribute read for what is decided per iteration,
the checks that can change between calls, and one kernel (colsum.py). Hooks never raise
into training: any error disables the probe with one warning.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_moe_probe import stats
from megatron_moe_probe.accumulator import RankLayout
from megatron_moe_probe.megatron.method_wrap import MethodWrap
from megatron_moe_probe.megatron.runtime import layer_runtime

log = logging.getLogger("megatron_moe_probe")

KNOWN_DISPATCHERS = ("MoEAlltoAllTokenDispatcher", "MoEAllGatherTokenDispatcher", "MoEFlexTokenDispatcher")


class ProbeSetupError(ValueError):
    """The model cannot be probed (no MoE layers, inconsistent layers...)."""


def _graph_warmup_flag():
    """Megatron's own "warming up for graph capture" flag (local CUDA graphs run eager warm-up
    passes inside train_step before they capture); a function that says False without it."""
    try:
        from megatron.core.transformer.cuda_graphs import is_graph_warmup

        return is_graph_warmup
    except Exception:  # pragma: no cover - older/newer Megatron without the flag
        return lambda: False


def graphs_already_captured(model_chunks=()) -> Optional[str]:
    """The CUDA-graph setting whose graphs exist already, if any: a probe attached now would
    never see the router calls those graphs replay, so it must not start."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:  # TE graphs hang off each TransformerLayer (`layer.cuda_graphs`)
        if any(getattr(m, "cuda_graphs", None) for m in chunk.modules()):
            return "--cuda-graph-impl transformer_engine (graphs captured before the probe attached)"
    try:
        from megatron.core.full_cuda_graph import FullCudaGraphWrapper

        if FullCudaGraphWrapper.cuda_graph.get("training") is not None:
            return "--cuda-graph-impl full_iteration (graph captured before the probe attached)"
    except Exception:
        pass
    try:
        from megatron.core.transformer.cuda_graphs import _CudagraphGlobalRecord

        if getattr(_CudagraphGlobalRecord, "cudagraph_created", False):
            return "--cuda-graph-impl local (graphs captured before the probe attached)"
    except Exception:
        pass
    return None


def find_moe_layers(model_chunks) -> list:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MoELayer)]


def layer_slot(router, num_layers: int) -> int:
    """0-based row for a router: its global layer number, MTP layers after the decoder's."""
    number = getattr(router, "layer_number", None)
    if number is None:
        raise ProbeSetupError("a MoE router has no layer number (was the layer built by TransformerLayer?)")
    return (num_layers if getattr(router, "is_mtp_layer", False) else 0) + int(number) - 1


def _group_ranks(group) -> list[int]:
    if not (dist.is_available() and dist.is_initialized()):
        return [0]
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def group_rank_size(group=None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def build_layout(moe_layers: list, gpus_per_node: Optional[int] = None) -> RankLayout:
    """Derive EP rank/size, TP weighting and node locality from the first MoE layer."""
    if not moe_layers:
        raise ProbeSetupError("the model has no Megatron MoE layers (num_moe_experts unset?): nothing to probe")
    first = moe_layers[0]
    config = first.config
    dispatcher = first.token_dispatcher
    ep_group = getattr(dispatcher, "ep_group", None)
    ep_rank, ep_size = group_rank_size(ep_group)
    ep_ranks = _group_ranks(ep_group)
    if gpus_per_node is None:
        gpus_per_node = _local_world_size()
    nodes = stats.node_of_ranks(ep_ranks, gpus_per_node)
    locality = stats.locality_classes(nodes[ep_rank], nodes, ep_rank)
    # Without sequence parallelism every TP rank's router sees the same tokens: count them once.
    tp_rank, tp_size = group_rank_size(getattr(first.router, "tp_group", None))
    weight = 1 if (tp_size == 1 or config.sequence_parallel or tp_rank == 0) else 0
    num_slots = config.num_layers + int(getattr(config, "mtp_num_layers", None) or 0)
    return RankLayout(
        num_layer_slots=num_slots,
        num_experts=config.num_moe_experts,
        ep_size=ep_size,
        ep_rank=ep_rank,
        destination_locality=tuple(int(c) for c in locality),
        count_weight=weight,
        gpus_per_node=gpus_per_node,
    )


def _local_world_size() -> int:
    import os

    for var in ("LOCAL_WORLD_SIZE", "SLURM_GPUS_ON_NODE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class LayerBinding:
    """One MoE layer as the probe sees it (what IntervalContributor.attach receives)."""

    slot: int  # 0-based global layer row
    router: object
    dispatcher: object
    layer: object  # the MoELayer module


class _CapacityContext(threading.local):
    """Which router is running, so the module-level dropping wrapper knows where to count."""

    binding: Optional[LayerBinding] = None


class MegatronRouterHooks:
    """Finds the MoE layers of Megatron model chunks and puts the counting hooks on their routers
    (`attach`), the dispatcher timer on their dispatchers (`make_timer`). `detach()` removes all."""

    def __init__(self, model_chunks, *, gpus_per_node: Optional[int] = None, device: Optional[torch.device] = None):
        self.moe_layers = find_moe_layers(model_chunks)
        self.layout = build_layout(self.moe_layers, gpus_per_node)
        config = self.moe_layers[0].config
        self.capacity = config.moe_expert_capacity_factor is not None
        self.topk = config.moe_router_topk
        if device is None:
            device = next(self.moe_layers[0].router.parameters()).device
            if device.type == "cpu" and torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.graph_warmup = _graph_warmup_flag()
        already = graphs_already_captured(model_chunks)
        if already:
            raise ProbeSetupError(f"CUDA graphs exist already ({already}); attach the probe before capture")
        self.dispatcher_types = sorted({type(m.token_dispatcher).__name__ for m in self.moe_layers})
        unknown = [d for d in self.dispatcher_types if d not in KNOWN_DISPATCHERS]
        if unknown:
            log.warning("moe-probe: unknown token dispatcher %s; routing counts still come from the router, "
                        "dispatcher timing is unavailable", ", ".join(unknown))
        self._handles = []
        self._ctx = _CapacityContext()
        self.bindings: list[LayerBinding] = []
        self.accumulator = None
        self.gate = None
        self._fail = None
        seen = set()
        for layer in self.moe_layers:
            slot = layer_slot(layer.router, config.num_layers)
            if slot in seen:
                raise ProbeSetupError(f"two MoE routers claim layer {slot + 1}")
            if not 0 <= slot < self.layout.num_layer_slots:
                raise ProbeSetupError(f"router layer number {slot + 1} is outside 1..{self.layout.num_layer_slots}")
            seen.add(slot)
            self.bindings.append(LayerBinding(slot, layer.router, layer.token_dispatcher, layer))

    def attach(self, accumulator, gate, on_error) -> None:
        """Count every router call `gate` lets through into `accumulator`; `on_error(exc)` on failure."""
        self.accumulator, self.gate, self._fail = accumulator, gate, on_error
        for binding in self.bindings:
            accumulator.register_layer(binding.slot)
        self._register_hooks()

    def _register_hooks(self) -> None:
        for binding in self.bindings:
            router = binding.router
            if self.capacity:  # the dropping wrapper counts; it needs to know which router is running
                # (a wrapper of router.routing, not a forward pre-hook: Megatron's local CUDA graphs
                # refuse graphed layers whose submodules carry user pre-hooks)
                self._handles.append(MethodWrap(router, "routing", self._make_routing_wrapper(binding)))
                self._handles.append(router.register_forward_hook(self._make_capacity_fallback(binding)))
            else:
                self._handles.append(router.register_forward_hook(self._make_hook(binding)))
        if self.capacity:
            _DroppingWrapper.install(self)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.capacity:
            _DroppingWrapper.uninstall(self)

    def pause(self) -> None:
        """Remove the hooks (zero cost while paused); counters keep what they have."""
        self._remove_hooks()

    def resume(self) -> None:
        if not self._handles and self.accumulator is not None:
            self._register_hooks()

    def make_timer(self, gate, every: int = 1, backward: bool = False):
        """A DispatcherTimer on token_dispatch / token_combine of every layer (CUDA events, one
        iteration in `every`, read at the flush); backward=True adds the backward calls."""
        from megatron_moe_probe.megatron.timing import DispatcherTimer

        known = [b for b in self.bindings if type(b.dispatcher).__name__ in KNOWN_DISPATCHERS]
        return DispatcherTimer(known, self.layout.num_layer_slots, gate, every=every, backward=backward)

    def make_checks(self, gate, settings, *, request_stop, announce: bool) -> list:
        """The interval contributors the settings ask for: router health (megatron/router_watch.py)
        always, the dispatch integrity check (megatron/exchange_check.py) unless
        `--moe-probe-integrity off`. `announce`: this rank logs a violation (the writers' rank)."""
        from megatron_moe_probe.megatron.exchange_check import ExchangeCheck
        from megatron_moe_probe.megatron.router_watch import RouterHealth

        slots, experts = self.layout.num_layer_slots, self.layout.num_experts
        checks = [RouterHealth(gate.should_count, num_slots=slots, num_experts=experts, device=self.device,
                               weight=self.layout.count_weight, capturing=gate.capturing)]
        if settings.integrity != "off":
            checks.append(ExchangeCheck(gate.should_count, num_slots=slots, num_experts=experts,
                                        ep_size=self.layout.ep_size, device=self.device, mode=settings.integrity,
                                        payload_every=settings.integrity_payload_every,
                                        use_triton=self.accumulator.use_triton,
                                        announce=announce, request_stop=request_stop, capturing=gate.capturing))
        return checks

    # ---- hooks: the hot path -----------------------------------------------------------------

    def _make_routing_wrapper(self, binding: LayerBinding):
        ctx, gate, router = self._ctx, self.gate, binding.router

        def make(original):
            def routing(*args, **kwargs):
                try:
                    counted = (gate.open or gate.capturing()) and gate.should_count(router)
                    ctx.binding = binding if counted else None
                except Exception as exc:  # never break training
                    ctx.binding = None
                    self._fail(exc)
                return original(*args, **kwargs)

            return routing

        return make

    def _make_hook(self, binding: LayerBinding):
        gate, slot = self.gate, binding.slot
        add = self.accumulator.add_routing_map

        def hook(module, args, output):
            # `gate.open` is False between iterations and after an error: one attribute read then.
            # Under CUDA-graph capture (which TE runs before the first iteration) it may be closed
            # and still count, so capture is checked before giving up.
            if not gate.open and not gate.capturing():
                return
            try:
                if gate.should_count(module):
                    add(slot, output[1], gate.capture_flag())
            except Exception as exc:
                self._fail(exc)

        return hook

    def _make_capacity_fallback(self, binding: LayerBinding):
        ctx, slot = self._ctx, binding.slot

        def hook(module, args, output):
            # The router did not call apply_router_token_dropping (the wrapper clears the binding
            # when it counts): count its map as it is, nothing was dropped.
            if ctx.binding is None:
                return
            ctx.binding = None
            try:
                self.accumulator.add_routing_map(slot, output[1], self.gate.capture_flag())
            except Exception as exc:
                self._fail(exc)

        return hook

    def _on_dropping(self, before: torch.Tensor, after: torch.Tensor) -> None:
        binding = self._ctx.binding
        if binding is None:
            return
        self._ctx.binding = None  # one count per router call
        try:
            self.accumulator.add_capacity_maps(binding.slot, before, after, self.gate.capture_flag())
        except Exception as exc:
            self._fail(exc)

    # ---- per interval ------------------------------------------------------------------------

    def run_meta(self) -> dict:
        """What each record's meta says about the live layers (no device work)."""
        return {"dispatcher": self.dispatcher_types, "topk": self.topk, "gpus_per_node": self.layout.gpus_per_node,
                "runtime_dispatchers": layer_runtime((b.slot + 1, b.dispatcher) for b in self.bindings)}

    def detach(self) -> None:
        self._remove_hooks()


class _DroppingWrapper:
    """Wraps megatron.core.transformer.moe.router.apply_router_token_dropping while any probe needs it."""

    _hooks: list[MegatronRouterHooks] = []
    _original = None

    @classmethod
    def install(cls, hooks: MegatronRouterHooks) -> None:
        from megatron.core.transformer.moe import router as router_module

        if cls._original is None:
            cls._original = router_module.apply_router_token_dropping
            original = cls._original

            def apply_router_token_dropping(routing_probs, routing_map, *args, **kwargs):
                probs, final_map = original(routing_probs, routing_map, *args, **kwargs)
                for h in cls._hooks:
                    h._on_dropping(routing_map, final_map)
                return probs, final_map

            router_module.apply_router_token_dropping = apply_router_token_dropping
        cls._hooks.append(hooks)

    @classmethod
    def uninstall(cls, hooks: MegatronRouterHooks) -> None:
        from megatron.core.transformer.moe import router as router_module

        if hooks in cls._hooks:
            cls._hooks.remove(hooks)
        if not cls._hooks and cls._original is not None:
            router_module.apply_router_token_dropping = cls._original
            cls._original = None
