"""Router health from inside Megatron's routers: an interval contributor ("router_health").

Wraps each MoE router's `routing(logits, ...)` (an instance attribute, removed on detach):
the logits are what the gating produced, the returned routing map is the router's final
decision (after capacity dropping). It feeds `router_health.RouterHealthAccumulator` for the
router calls the session counts (its gate: training forwards inside an iteration, no
recompute; under CUDA-graph capture the kernels are captured into fixed buffers, so each
replay counts). The expert bias (`--moe-router-enable-expert-bias`) is read once per interval
in `device_parts`, on the device.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from megatron_moe_probe import router_health
from megatron_moe_probe.megatron.method_wrap import MethodWrap
from megatron_moe_probe.router_health import RouterHealthAccumulator

log = logging.getLogger("megatron_moe_probe")


DEFAULT_EVERY = 8  # score statistics on one iteration in N (the counts behind tpe_* are exact)


class RouterHealth:
    name = "router_health"

    def __init__(self, gate: Callable[[object], bool], *, num_slots: int, num_experts: int,
                 device: torch.device, weight: int = 1, every: int = DEFAULT_EVERY,
                 capturing: Callable[[], bool] = lambda: False):
        """weight 0: this rank's routers see a copy of another rank's tokens (TP without
        sequence parallelism), so it adds nothing but the expert bias. every: the score
        statistics sample iterations 0, N, 2N, ... since attach."""
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.gate, self.capturing = gate, capturing
        # Layers whose routing ran inside a CUDA-graph capture: their score statistics are not
        # sampled (a replay runs no Python, so it could not keep to one iteration in N).
        self.captured_slots: set[int] = set()
        self.weight = weight
        self.every = every
        self.iteration = 0
        self.sampled = 0  # iterations sampled in this interval
        self.acc = RouterHealthAccumulator(num_slots, num_experts, device)
        self.bindings: list = []
        self.enabled = True
        self._wrapped: list[MethodWrap] = []

    def attach(self, bindings) -> None:
        for b in bindings:
            self.bindings.append(b)
            self._wrap(b)

    def _wrap(self, binding) -> None:
        router = binding.router
        config = router.config

        def make(original):
            def routing(logits, *args, **kwargs):
                probs, routing_map = original(logits, *args, **kwargs)
                if self.enabled and self.weight and self.iteration % self.every == 0 and self.gate(router):
                    if self.capturing():
                        self.captured_slots.add(binding.slot)
                        return probs, routing_map
                    try:
                        with torch.no_grad():
                            self.acc.record(binding.slot, logits, routing_map, topk=config.moe_router_topk,
                                            score_function=config.moe_router_score_function,
                                            expert_bias=getattr(router, "expert_bias", None))
                    except Exception as exc:  # never break training
                        log.warning("moe-probe: router health off after an error (training continues): %r", exc)
                        self.enabled = False
                return probs, routing_map

            return routing

        self._wrapped.append(MethodWrap(router, "routing", make))

    def detach(self) -> None:
        for wrap in self._wrapped:
            wrap.remove()
        self._wrapped.clear()
        self.enabled = False

    def step(self) -> None:
        self.sampled += int(self.iteration % self.every == 0)
        self.iteration += 1

    def device_parts(self) -> list[torch.Tensor]:
        for b in self.bindings:
            bias = getattr(b.router, "expert_bias", None)
            if bias is not None:
                self.acc.add_bias(b.slot, bias.detach())
        return [self.acc.floats, self.acc.ints]

    def read(self, reduced: list[torch.Tensor], snapshot) -> dict:
        layers = list(getattr(snapshot, "layers", None) or [])
        counts = getattr(snapshot, "tokens_per_expert", None)
        if layers and counts is not None:  # the probe's exact interval counts, rows in `layers` order
            exact = {layer - 1: counts[i] for i, layer in enumerate(layers)}
        else:
            exact = None
            layers = [s + 1 for s in (reduced[1][-self.acc.num_slots:] > 0).nonzero().flatten().tolist()]
        block = router_health.summarize(reduced[0], reduced[1], self.acc, [x - 1 for x in layers], exact)
        block["every"], block["sampled_iterations"] = self.every, self.sampled
        if self.captured_slots:  # their score statistics are missing, not zero
            block["unsampled_layers"] = sorted(s + 1 for s in self.captured_slots)
            block["unsampled_reason"] = "routing captured in a CUDA graph"
        extras = getattr(snapshot, "extras", None)
        if extras is None:
            extras = snapshot.extras = {}
        extras[self.name] = block
        return block

    def reset(self) -> None:
        self.acc.reset()
        self.sampled = 0
