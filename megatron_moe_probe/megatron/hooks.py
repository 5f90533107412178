"""The adapter between Megatron-Core 0.19 MoE layers and RoutingProbe.

Everything that touches Megatron internals for counting lives here:
- a forward hook on every MoE layer's router (`TopKRouter.forward` returns
  `(probs, routing_map)` for every dispatcher: allgather, alltoall, flex);
- with a capacity factor, a wrapper around `router.apply_router_token_dropping`
  (module global in megatron.core.transformer.moe.router) that sees the routing
  map before and after dropping, so dropped tokens are counted and padding is not;
- layer numbers (global, 1-based, from `router.layer_number`; MTP layers after the
  decoder's layers), EP rank/size and node locality from the dispatcher's groups.

What is counted (the counting contract, docs/metrics.md): router calls of training
forward passes. A training loop that tells the probe where its iterations are
(`open_step` / `close_step`, as ProbeSession does around Megatron's `train_step`)
gets nothing else: no evaluation, no CUDA-graph warm-up pass, no call between
iterations. Activation recomputation is never counted. Under CUDA-graph capture the
hook's kernels are captured (they land in a fixed buffer, see probe.py), so each
replay counts the pass it runs and the capture itself counts nothing.

Hooks never raise into training: any error disables the probe with one warning.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_moe_probe import stats
from megatron_moe_probe.megatron.runtime import layer_runtime
from megatron_moe_probe.probe import ProbeLayout, RoutingProbe, Snapshot

log = logging.getLogger("megatron_moe_probe")

KNOWN_DISPATCHERS = ("MoEAlltoAllTokenDispatcher", "MoEAllGatherTokenDispatcher", "MoEFlexTokenDispatcher")


class ProbeSetupError(ValueError):
    """The model cannot be probed (no MoE layers, inconsistent layers...)."""


def _in_recomputation() -> bool:
    """True while activations are recomputed: the router already counted these tokens.

    Megatron 0.19 sets IS_CHECKPOINTING in both the first (no-grad) forward and the
    recompute, so that flag cannot tell them apart. Every recompute (Megatron's,
    transformer-engine's, torch's non-reentrant checkpoint) runs inside the autograd
    engine's backward pass, and that is what this checks.
    """
    return torch._C._current_graph_task_id() != -1


_CUDA = None  # torch.cuda.is_available(), asked once: the hook runs per router call


def _stream_capturing() -> bool:
    global _CUDA
    if _CUDA is None:
        _CUDA = torch.cuda.is_available()
    return _CUDA and torch.cuda.is_current_stream_capturing()


def _graph_warmup_flag():
    """Megatron's own "warming up for graph capture" flag (local CUDA graphs run eager warm-up
    passes inside train_step before they capture); a function that says False without it."""
    try:
        from megatron.core.transformer.cuda_graphs import is_graph_warmup

        return is_graph_warmup
    except Exception:  # pragma: no cover - older/newer Megatron without the flag
        return lambda: False


# Probes whose hook kernels were captured into a CUDA graph: a graph holds raw pointers to
# their buffers and may replay after detach, so the buffers must outlive the probe.
_CAPTURED_PROBES: list = []


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


def build_layout(moe_layers: list, gpus_per_node: Optional[int] = None) -> ProbeLayout:
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
    return ProbeLayout(
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
class _LayerBinding:
    slot: int
    router: object
    dispatcher: object


class _CapacityContext(threading.local):
    """Which router is running, so the module-level dropping wrapper knows where to count."""

    binding: Optional[_LayerBinding] = None
    counted: bool = False


class MegatronProbe:
    """Attaches a RoutingProbe to Megatron model chunks. `detach()` removes every hook."""

    def __init__(self, model_chunks, *, gpus_per_node: Optional[int] = None, history_steps: int = 100,
                 device: Optional[torch.device] = None, reduce_group=None,
                 domains: Optional[list[str]] = None, iteration_matrix: bool = False):
        self.moe_layers = find_moe_layers(model_chunks)
        self.layout = build_layout(self.moe_layers, gpus_per_node)
        config = self.moe_layers[0].config
        self.capacity = config.moe_expert_capacity_factor is not None
        self.topk = config.moe_router_topk
        if device is None:
            device = next(self.moe_layers[0].router.parameters()).device
            if device.type == "cpu" and torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
        self.probe = RoutingProbe(self.layout, device=device, history_steps=history_steps,
                                  track_capacity=self.capacity, reduce_group=reduce_group,
                                  domains=domains, iteration_matrix=iteration_matrix)
        self.enabled = True
        # Outside a gated loop every training forward counts; a loop that calls open_step /
        # close_step (ProbeSession) counts only inside its iterations.
        self.gated = False
        self.in_step = True
        self._graph_warmup = _graph_warmup_flag()
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
        self.bindings: list[_LayerBinding] = []
        seen = set()
        for layer in self.moe_layers:
            slot = layer_slot(layer.router, config.num_layers)
            if slot in seen:
                raise ProbeSetupError(f"two MoE routers claim layer {slot + 1}")
            if not 0 <= slot < self.layout.num_layer_slots:
                raise ProbeSetupError(f"router layer number {slot + 1} is outside 1..{self.layout.num_layer_slots}")
            seen.add(slot)
            binding = _LayerBinding(slot, layer.router, layer.token_dispatcher)
            self.bindings.append(binding)
            self.probe.register_layer(slot)
        self._register_hooks()

    def _register_hooks(self) -> None:
        for binding in self.bindings:
            router = binding.router
            if self.capacity:  # only the dropping wrapper needs to know which router is running
                self._handles.append(router.register_forward_pre_hook(self._make_pre_hook(binding)))
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
        if not self._handles:
            self._register_hooks()

    # ---- hooks -----------------------------------------------------------------------------

    def _should_count(self, router) -> bool:
        if not (self.enabled and router.training) or _in_recomputation():
            return False
        if _stream_capturing():
            # Captured kernels run once per replay, and each replay is a training pass;
            # the capture itself executes nothing.
            self.probe.captured = True
            return True
        return self.in_step and not self._graph_warmup()

    def _should_time(self, binding) -> bool:
        # CUDA events cannot be timed inside a graph capture: only eager dispatcher calls are timed.
        return self._should_count(binding.router) and not _stream_capturing()

    def open_step(self) -> None:
        """A training iteration starts: count its router calls (and nothing else, once gated)."""
        self.gated = True
        self.in_step = True

    def close_step(self) -> None:
        self.in_step = not self.gated

    def enable_timing(self, max_events: int = 65536, backward: bool = True) -> None:
        """Time token_dispatch / token_combine of every layer (CUDA events, read at flush);
        backward=False times the forward calls only, at about half the host cost."""
        from megatron_moe_probe.megatron.timing import DispatcherTimer

        known = [b for b in self.bindings if type(b.dispatcher).__name__ in KNOWN_DISPATCHERS]
        timer = DispatcherTimer(known, self.layout.num_layer_slots, self._should_time,
                                max_events=max_events, backward=backward)
        self.probe.timers.append(timer)

    def _make_pre_hook(self, binding: _LayerBinding):
        def pre_hook(module, args):
            try:
                self._ctx.binding = binding if self._should_count(module) else None
                self._ctx.counted = False
            except Exception as exc:  # never break training
                self._fail(exc)

        return pre_hook

    def _make_hook(self, binding: _LayerBinding):
        def hook(module, args, output):
            try:
                counted = self._ctx.counted
                self._ctx.binding, self._ctx.counted = None, False
                if counted or not self._should_count(module):
                    return
                _, routing_map = output
                self.probe.record_routing(binding.slot, routing_map)
            except Exception as exc:
                self._fail(exc)

        return hook

    def _on_dropping(self, before: torch.Tensor, after: torch.Tensor) -> None:
        binding = self._ctx.binding
        if binding is None:
            return
        try:
            kept_map = before & after
            kept = kept_map.sum(0)
            self.probe.record_counts(binding.slot, kept, before.sum(0) - kept, kept_map)
            self._ctx.counted = True
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.enabled:
            log.warning("moe-probe: disabled after an error in a hook (training continues): %r", exc)
        self.enabled = False
        self.probe.failed = True  # reported to every rank at the next flush

    # ---- API -------------------------------------------------------------------------------

    def set_domain(self, dataset_ids: torch.Tensor, seq_length: int) -> None:
        """The coming micro-batch's dataset id per sample (see RoutingProbe.set_sample_domains);
        call before its forward. Never raises into training."""
        try:
            self.probe.set_sample_domains(dataset_ids, seq_length)
        except Exception as exc:
            self._fail(exc)

    def step(self) -> None:
        # Steps are counted even when disabled so every rank's history stays the same shape.
        self.probe.step()
        for timer in self.probe.timers:
            timer.step()

    def snapshot(self, step: Optional[int] = None) -> Snapshot:
        snap = self.probe.snapshot(step)
        snap.meta.update(
            dispatcher=self.dispatcher_types,
            topk=self.topk,
            gpus_per_node=self.layout.gpus_per_node,
            probe_enabled=self.enabled,
            runtime_dispatchers=layer_runtime((b.slot + 1, b.dispatcher) for b in self.bindings),
        )
        return snap

    def disable_timing(self) -> None:
        for timer in list(self.probe.timers):
            remove = getattr(timer, "remove", None)
            if remove:
                remove()
        self.probe.timers.clear()

    def detach(self) -> None:
        self._remove_hooks()
        self.disable_timing()
        self.enabled = False
        if self.probe.captured and self.probe not in _CAPTURED_PROBES:
            _CAPTURED_PROBES.append(self.probe)


class _DroppingWrapper:
    """Wraps megatron.core.transformer.moe.router.apply_router_token_dropping while any probe needs it."""

    _probes: list[MegatronProbe] = []
    _original = None

    @classmethod
    def install(cls, probe: MegatronProbe) -> None:
        from megatron.core.transformer.moe import router as router_module

        if cls._original is None:
            cls._original = router_module.apply_router_token_dropping
            original = cls._original

            def apply_router_token_dropping(routing_probs, routing_map, *args, **kwargs):
                probs, final_map = original(routing_probs, routing_map, *args, **kwargs)
                for p in cls._probes:
                    p._on_dropping(routing_map, final_map)
                return probs, final_map

            router_module.apply_router_token_dropping = apply_router_token_dropping
        cls._probes.append(probe)

    @classmethod
    def uninstall(cls, probe: MegatronProbe) -> None:
        from megatron.core.transformer.moe import router as router_module

        if probe in cls._probes:
            cls._probes.remove(probe)
        if not cls._probes and cls._original is not None:
            router_module.apply_router_token_dropping = cls._original
            cls._original = None


def attach(model_chunks: Iterable, **kwargs) -> MegatronProbe:
    """Attach a probe to Megatron model chunks (a module or a list, as Megatron's `model`)."""
    return MegatronProbe(model_chunks, **kwargs)
