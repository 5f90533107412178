"""Dispatcher timing: CUDA-event time of `token_dispatch` and `token_combine` per layer.

Sampled: one iteration in `every` is timed (the first of each report interval, then every
`every`-th), and the others pay one attribute read per wrapped call. The reported value is the
mean over the timed iterations, and the record's meta says how many there were
(`timing_sampled_iterations`) and the sampling (`timing_every`).

Forward: an event pair around the call. Backward (mode "all" only): tensor hooks record an
event when the gradient of the call's output arrives (its backward communication starts) and
when the gradient of its input is ready (it has finished). Events come from a pool made at
attach time and reused every interval; they are read only when the session flushes, so timing
adds no host synchronization; the pool bounds memory, and what did not fit is reported.

Only `token_dispatch` / `token_combine` are wrapped: they are the communication
steps of every 0.19 dispatcher (all-to-all, all-gather / reduce-scatter, DeepEP,
HybridEP), and hooks elsewhere (MoELayer.forward, flex `dispatch_preprocess`) are
bypassed by comm overlap or torch.compile.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from megatron_moe_probe.megatron.method_wrap import MethodWrap
from megatron_moe_probe.record import PHASES

log = logging.getLogger("megatron_moe_probe")


class _EventPool:
    def __init__(self, capacity: int, preallocate: int = 0):
        self.capacity = capacity
        self._events: list = [torch.cuda.Event(enable_timing=True) for _ in range(min(preallocate, capacity))]
        self.used = 0

    def take(self):
        if self.used >= self.capacity:
            return None
        if self.used == len(self._events):
            self._events.append(torch.cuda.Event(enable_timing=True))
        event = self._events[self.used]
        self.used += 1
        return event

    def reset(self):
        self.used = 0


def _first_tensor(value):
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            if torch.is_tensor(v):
                return v
    return None


class DispatcherTimer:
    """Wraps the dispatchers of `bindings` (objects with .slot and .dispatcher); a session timer."""

    def __init__(self, bindings, num_slots: int, gate, every: int = 1, max_events: int = 65536,
                 backward: bool = False):
        self.num_slots = num_slots
        # Backward timing is half the timer's host cost (two tensor hooks per call, run by autograd).
        self.backward = backward
        self.gate = gate
        self.every = max(1, int(every))
        self._position = 0  # iterations since the last read
        self.sampled = 0  # timed iterations since the last read
        self.active = True  # this iteration is timed (the first of each interval is)
        bindings = list(bindings)
        # Events for about four micro-batches of a timed iteration, made now; more on demand.
        per_iteration = len(bindings) * 2 * 2 * (2 if backward else 1)
        self.pool = _EventPool(max_events, preallocate=4 * per_iteration if torch.cuda.is_available() else 0)
        self._pairs: list[tuple[int, str, object, object]] = []
        self.skipped = 0
        self._restore: list[MethodWrap] = []
        for b in bindings:
            for method, phase in (("token_dispatch", "dispatch"), ("token_combine", "combine")):
                if hasattr(b.dispatcher, method):
                    self._wrap(b, method, phase)

    last_sampled = 0  # timed iterations of the interval read last

    @property
    def meta(self) -> dict:
        return {"timing_every": self.every, "timing_backward": self.backward,
                "timing_sampled_iterations": self.last_sampled}

    def _wrap(self, binding, method: str, phase: str) -> None:
        dispatcher, slot, router = binding.dispatcher, binding.slot, binding.router
        timer, gate = self, self.gate
        forward_phase = f"{phase}_fwd"

        def make(original):
            def timed(*args, **kwargs):
                # Untimed iterations: one attribute read. CUDA events cannot be recorded inside a
                # graph capture: only eager calls of counted passes are timed.
                if not timer.active or not gate.should_count(router) or gate.capturing():
                    return original(*args, **kwargs)
                start = timer.pool.take()
                if start is not None:
                    start.record()
                out = original(*args, **kwargs)
                end = timer.pool.take()
                if start is None or end is None:
                    timer.skipped += 1
                    return out
                end.record()
                timer._pairs.append((slot, forward_phase, start, end))
                if timer.backward:
                    timer._time_backward(slot, phase, _first_tensor(args), _first_tensor(out))
                return out

            return timed

        self._restore.append(MethodWrap(dispatcher, method, make))

    def _time_backward(self, slot: int, phase: str, inp, out) -> None:
        if inp is None or out is None or not (inp.requires_grad and out.requires_grad):
            return
        key_holder: dict = {}

        def on_output_grad(grad):
            start = self.pool.take()
            if start is not None:
                start.record()
                key_holder["start"] = start
            return None

        def on_input_grad(grad):
            start = key_holder.pop("start", None)
            end = self.pool.take() if start is not None else None
            if end is None:
                if start is not None:
                    self.skipped += 1
                return None
            end.record()
            self._pairs.append((slot, f"{phase}_bwd", start, end))
            return None

        out.register_hook(on_output_grad)
        inp.register_hook(on_input_grad)

    def step(self) -> None:
        """After each iteration: count it if it was timed, and decide whether the next one is."""
        self.sampled += int(self.active)
        self._position += 1
        self.active = self._position % self.every == 0

    def read_and_reset(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean milliseconds per timed iteration for each phase, [len(rows)] in `rows` order (NaN
        where a phase never ran). Synchronizes on the events: call only at a flush."""
        totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(self.num_slots, dtype=torch.float64))
        seen: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(self.num_slots, dtype=torch.bool))
        for slot, phase, start, end in self._pairs:
            end.synchronize()
            totals[phase][slot] += start.elapsed_time(end)
            seen[phase][slot] = True
        steps = max(self.sampled, 1)
        out = {}
        for phase in PHASES:
            if phase in totals:
                values = totals[phase] / steps
                values[~seen[phase]] = float("nan")
                out[phase] = values[rows]
        if self.skipped:
            log.warning("moe-probe: dispatcher timing skipped %d calls this interval (event pool of %d full)",
                        self.skipped, self.pool.capacity)
        out_meta = self.sampled
        self._pairs.clear()
        self.pool.reset()
        self.skipped = 0
        self.sampled = 0
        self._position = 0
        self.active = True  # the next interval's first iteration is timed
        self.last_sampled = out_meta
        return out

    def remove(self) -> None:
        for wrap in reversed(self._restore):
            wrap.remove()
        self._restore.clear()
