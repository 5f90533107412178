"""Did the dispatcher deliver what the router decided? Hooks on Megatron's token dispatchers.

An interval contributor (the session's extension point): it wraps four methods of each MoE
layer's token dispatcher (instance attributes, removed on detach) and feeds
`integrity.IntegrityAccumulator`:

    dispatch_preprocess -> output: the rows as the sender lays them out (alltoall: grouped by
                           destination expert; allgather: the local tokens and their routing map)
    dispatch_postprocess-> output: the rows each expert receives, and the dispatcher's own
                           tokens_per_expert
    combine_preprocess  -> output: the expert outputs as they go back (alltoall only)
    combine_postprocess -> input: the expert outputs as their source received them

The exchange itself (token_dispatch / token_combine: all-to-all, TP all-gather and
reduce-scatter, allgather) sits between the hooks and is what is checked. Only forwards the
session counts are checked (training forwards inside an iteration, no recompute), on every
rank alike, so the sums over ranks meet. Calls under CUDA-graph capture are not checked
(their segment sizes live on the host); flex dispatchers are listed as unchecked.

The payload check runs every `payload_every` iterations (stated in the record); the count
check runs on every checked forward. No host sync: everything is device adds, and the
dispatcher's host-side counts go to the device with a non-blocking copy.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from megatron_moe_probe import colsum, integrity, integrity_report
from megatron_moe_probe.integrity import IntegrityAccumulator, row_fingerprints, segment_sums
from megatron_moe_probe.megatron.method_wrap import MethodWrap

log = logging.getLogger("megatron_moe_probe")

MODES = ("off", "warn", "fail")
# The payload check (an int8-GEMM fingerprint of every row, ~50 ATen ops per layer forward) cost 11.8 ms
# of H100 GPU time per layer forward at the Qwen3-30B-A3B shape (benchmarks/integrity_cost.py micro):
# off unless asked for (settings.DEFAULT_INTEGRITY_PAYLOAD_EVERY = 0); N > 0 samples iterations 0, N,
# 2N, ... since attach. The count check runs on every iteration.
DEFAULT_PAYLOAD_EVERY = 0
_METHODS = ("dispatch_preprocess", "dispatch_postprocess", "combine_preprocess", "combine_postprocess")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def captured_note(slots) -> str:
    """The `unchecked` entry naming the layers whose dispatch a CUDA graph captured."""
    layers = ",".join(str(s + 1) for s in sorted(slots))
    return f"layers {layers}: dispatch captured in a CUDA graph"


class _Call:
    """What one layer's dispatcher remembers between its hooks within one forward. Each flag is
    cleared by the hook that consumes it, so a later forward whose send side ran inside a CUDA
    graph (no Python, no hook) never pairs its receive side with an older send."""

    active = False  # send side recorded, receive side pending
    combining = False  # dispatch checked, combine pending (alltoall)
    payload = False
    sent_counts: Optional[torch.Tensor] = None  # rows per global expert, as sent


class ExchangeCheck:
    """IntervalContributor "integrity": count and payload conservation of every MoE exchange."""

    name = "integrity"

    def __init__(self, gate: Callable[[object], bool], *, num_slots: int, num_experts: int,
                 ep_size: int, device: torch.device, payload_every: int = DEFAULT_PAYLOAD_EVERY,
                 mode: str = "warn", announce: bool = True,
                 request_stop: Optional[Callable[[str], None]] = None,
                 capturing: Callable[[], bool] = _capturing, use_triton: bool = False):
        """gate(router): does this forward count (the session's counting gate); capturing(): is a
        CUDA graph being captured (the gate's own, which asks CUDA once). mode "warn" logs a
        violation (where `announce`: one rank, the writers' rank), "fail" also calls
        `request_stop(line)` on every rank, which ends training at the iteration boundary."""
        if payload_every < 0:
            raise ValueError(f"payload_every must be 0 (off) or positive, got {payload_every}")
        if mode not in MODES:
            raise ValueError(f"integrity mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.gate, self.capturing = gate, capturing
        self.mode, self.announce, self.request_stop = mode, announce, request_stop
        self.ep_size = ep_size
        self.payload_every = payload_every
        self.acc = IntegrityAccumulator(num_slots, num_experts, device)
        self.device = device
        self.use_triton = use_triton  # the routing-map column sums by colsum.py's one kernel (as the router hook)
        self.iteration = 0  # counted iterations since attach: payload on iterations 0, N, 2N...
        self.unchecked: list[str] = []
        self.captured_slots: set[int] = set()  # layers whose dispatch ran inside a CUDA-graph capture
        self.enabled = True
        self._wrapped: list[MethodWrap] = []
        self._full_cache: dict[tuple[int, int], torch.Tensor] = {}

    # ---- contributor protocol --------------------------------------------------------------

    def attach(self, bindings) -> None:
        for b in bindings:
            kind = type(b.dispatcher).__name__
            if kind not in ("MoEAlltoAllTokenDispatcher", "MoEAllGatherTokenDispatcher"):
                if kind not in self.unchecked and self.announce:
                    log.warning("moe-probe: dispatch integrity is not checked for %s (alltoall and allgather "
                                "only); the routing counts are still exact", kind)
                self.unchecked.append(kind)
                continue
            for method in _METHODS:
                if kind == "MoEAllGatherTokenDispatcher" and method.startswith("combine"):
                    continue  # allgather combines by reduce-scatter (a sum): nothing to conserve
                self._wrap(b, method)

    def detach(self) -> None:
        for wrap in self._wrapped:
            wrap.remove()
        self._wrapped.clear()
        self.enabled = False

    def step(self) -> None:
        self.iteration += 1

    def device_parts(self) -> list[torch.Tensor]:
        self.acc.fold_host_counts()
        return [self.acc.buffer, self.acc.host_part().to(self.device)]

    def read(self, reduced: list[torch.Tensor], snapshot) -> integrity.Verdict:
        unchecked = list(self.unchecked)
        if self.captured_slots:
            unchecked.append(captured_note(self.captured_slots))
        verdict = integrity.judge(reduced[0], reduced[1], self.acc, ep_size=self.ep_size,
                                  payload_every=self.payload_every, unchecked=unchecked)
        extras = getattr(snapshot, "extras", None)
        if extras is None:
            extras = snapshot.extras = {}
        block = extras[self.name] = verdict.to_dict()
        meta = getattr(snapshot, "meta", None) or {}
        if meta.get("ranks_failed"):  # a rank stopped counting mid-interval: its sides are missing
            block["incomplete"] = True
            return verdict
        line = integrity_report.violation_line(block, int(getattr(snapshot, "step", 0) or 0),
                                               int(getattr(snapshot, "steps", 0) or 0))
        if line and self.mode != "off":
            if self.announce:
                log.error(line)
            if self.mode == "fail" and self.request_stop is not None:
                self.request_stop(line + " (--moe-probe-integrity fail: training stops at this iteration)")
        return verdict

    def reset(self) -> None:
        self.acc.reset()

    # ---- hooks -----------------------------------------------------------------------------

    @property
    def payload_now(self) -> bool:
        return self.payload_every > 0 and self.iteration % self.payload_every == 0

    def _wrap(self, binding, method: str) -> None:
        dispatcher = binding.dispatcher
        state = dispatcher.__dict__.setdefault("_moe_probe_call", _Call())
        observe = getattr(self, "_" + method)

        def make(original):
            def wrapper(*args, **kwargs):
                out = original(*args, **kwargs)
                if self.enabled:
                    try:
                        with torch.no_grad():
                            observe(binding, dispatcher, state, args, out)
                    except Exception as exc:  # never break training
                        self._fail(exc)
                return out

            return wrapper

        self._wrapped.append(MethodWrap(dispatcher, method, make))

    def _fail(self, exc: BaseException) -> None:
        log.warning("moe-probe: dispatch integrity check off after an error (training continues): %r", exc)
        self.enabled = False

    def _full(self, size: int, value: int) -> torch.Tensor:
        key = (size, value)
        t = self._full_cache.get(key)
        if t is None:
            t = self._full_cache[key] = torch.full((size,), value, dtype=torch.int64, device=self.device)
        return t

    def _dispatch_preprocess(self, binding, d, state: _Call, args, out) -> None:
        state.active = self.gate(binding.router)
        if state.active and self.capturing():
            # A replay runs no Python: this layer's exchange goes unchecked, and the record says so.
            state.active = False
            if binding.slot not in self.captured_slots:
                self.captured_slots.add(binding.slot)
                if self.announce and len(self.captured_slots) == 1:
                    log.warning("moe-probe: dispatch integrity is not checked where the dispatch is captured "
                                "into a CUDA graph (here from layer %d on; the record's integrity block lists "
                                "the layers); the routing counts are still exact", binding.slot + 1)
        if not state.active:
            return
        state.payload = self.payload_now
        slot, acc = binding.slot, self.acc
        rows = out[0]
        factor = d.tp_size  # expert-TP peers each receive every row: they hold the same experts
        allgather = type(d).__name__ == "MoEAllGatherTokenDispatcher"
        padded = not allgather and d.drop_and_pad  # every expert gets `capacity` rows, padding included
        counts = None  # rows per global expert as sent, as a device tensor (payload iterations only)
        if state.payload:
            if allgather:
                mask = d.routing_map.to(torch.int64)  # [T, E] of this rank's tokens
                counts = mask.sum(0)
                fp = row_fingerprints(rows).to(torch.float64)
                acc["dispatch_sent"][slot] += (mask.t().to(torch.float64) @ fp).to(torch.int64) * factor
            else:
                counts = self._full(acc.num_experts, int(d.capacity)) if padded else d.routing_map.sum(0)
                sums = segment_sums(row_fingerprints(rows), counts)
                acc["dispatch_sent"][slot] += sums * factor if factor != 1 else sums
        if not allgather:
            acc.rows_dispatched[slot] += int(rows.shape[0])
        # The sent counts: host arithmetic where they are known there, else the sums above, else
        # the routing map's column sums added in place (one kernel where Triton runs; compiled
        # for bool maps).
        if padded:
            acc.host_counts["sent_count"][slot] += int(d.capacity) * factor
        elif counts is not None:
            acc["sent_count"][slot] += counts * factor if factor != 1 else counts
        elif factor == 1:
            routing_map = d.routing_map
            colsum.add_column_sums(acc.sent_rows[slot], routing_map,
                                   self.use_triton and routing_map.dtype == torch.bool)
        else:
            acc["sent_count"][slot] += d.routing_map.sum(0) * factor
        state.sent_counts = counts
        acc.count_calls[slot] += 1
        acc.payload_calls[slot] += int(state.payload)

    def _dispatch_postprocess(self, binding, d, state: _Call, args, out) -> None:
        if not state.active:
            return
        state.active = False
        state.combining = type(d).__name__ == "MoEAlltoAllTokenDispatcher"
        rows, tokens_per_expert = out[0], out[1]
        lo = d.local_expert_indices[0]
        hi = lo + len(d.local_expert_indices)
        per_local = torch.as_tensor(tokens_per_expert)
        if per_local.device.type == "cpu":  # Megatron moved them to the host (and synchronized): add there
            self.acc.host_counts["received_count"][binding.slot, lo:hi] += per_local
        else:
            self.acc["received_count"][binding.slot, lo:hi] += per_local
        if state.payload:
            per_local = per_local.to(self.device, torch.int64, non_blocking=True)
            self.acc["dispatch_received"][binding.slot, lo:hi] += segment_sums(row_fingerprints(rows), per_local)

    def _combine_preprocess(self, binding, d, state: _Call, args, out) -> None:
        if not (state.combining and state.payload):
            return
        local = d.num_local_experts
        lo = d.local_expert_indices[0]
        fp = row_fingerprints(out)
        if local == 1:  # every row belongs to the one local expert
            sums = fp.sum(0, dtype=torch.int64, keepdim=True)
        else:
            if d.drop_and_pad:  # [EP source, local expert] blocks of `capacity` rows
                sizes = self._full(d.ep_size * local, int(d.capacity))
            else:  # [TP, EP, local] counts; this TP rank keeps its own slice after the reduce-scatter
                table = torch.as_tensor(d.num_global_tokens_per_local_expert).reshape(d.tp_size, d.ep_size, local)
                sizes = table[d.tp_rank].reshape(-1).to(self.device, torch.int64, non_blocking=True)
            sums = segment_sums(fp, sizes).view(-1, local, integrity.FINGERPRINT_WIDTH).sum(0)
        self.acc["combine_sent"][binding.slot, lo:lo + local] += sums

    def _combine_postprocess(self, binding, d, state: _Call, args, out) -> None:
        if not state.combining:
            return
        state.combining = False
        rows = args[0]
        self.acc.rows_returned[binding.slot] += int(rows.shape[0])
        if state.payload:
            self.acc["combine_received"][binding.slot] += segment_sums(row_fingerprints(rows), state.sent_counts)
