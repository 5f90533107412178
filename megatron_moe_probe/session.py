"""The probe's session: one object, made by one factory, that a training loop drives.

    session = open_session(model_chunks, settings, run_meta=meta)   # ProbeSettings in, session out
    for it in range(1, n + 1):
        session.start_step()          # counting opens: only this iteration's training forwards count
        ...forward / backward / optimizer...
        session.after_step(it)        # closes the iteration; every `interval` iterations: flush
    session.close(n)

`open_session` is used by `install()` (megatron/training.py), the Megatron-Bridge callback
(megatron/bridge.py) and the CPU demo (cpu/demo.py). The session owns everything the probe
keeps during training: the framework hooks (megatron/hooks.py, the only code that knows
Megatron), the device accumulator (accumulator.py), the dispatcher timers (megatron/timing.py),
any interval contributors (below) and the writers. Nothing framework-specific is imported
here; the factory asks the Megatron-Core adapter for hooks unless it is given another.

Collective: `after_step` on flush iterations, `flush` and `close` must be called by every rank
at the same iterations, as Megatron's train loop does. A flush is one all-reduce per dtype (the
int64 parts of the accumulator and of every contributor in one buffer, float64 parts in a
second) and one device->host copy each. Writers live on the last rank, where Megatron keeps
its own TensorBoard and wandb writers. Nothing here raises into training: an error switches
the probe off with one warning.

Interval contributors (the extension point): an object with the `IntervalContributor` shape,
added with `session.add_contributor(c)` before training, is attached to every MoE layer's
binding (slot, router, dispatcher, layer module), may count on the device from its own hooks
(gated by `session.gate.should_count(router)`, so it counts exactly the passes the router
counts), gets `step()` after each counted iteration, contributes 1-D int64 / float64 device
tensors to the flush's all-reduce and reads the reduced CPU copies back into
`snapshot.extras[c.name]`, which reaches the record's `meta["extras"]`. A contributor whose
verdict is that training must stop calls `session.request_stop(reason)` (from `read`, which
sees the same reduced numbers on every rank, so every rank stops at the same iteration);
`install()` then ends Megatron's train loop at that iteration boundary, after the last flush.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch

from megatron_moe_probe.accumulator import RoutingAccumulator, Snapshot
from megatron_moe_probe.record import IntervalReport
from megatron_moe_probe.settings import ProbeSettings

log = logging.getLogger("megatron_moe_probe")

# Observers (benchmarks, custom alerts): called with each new session / each report, on every rank.
session_callbacks: list = []
report_callbacks: list = []


@runtime_checkable
class IntervalContributor(Protocol):
    """A per-interval statistic that rides on the session's flush (see the module docstring)."""

    name: str  # key of its block in Snapshot.extras and in the record's meta["extras"]

    def attach(self, bindings) -> None:
        """bindings: one per MoE layer, with .slot (0-based global layer row), .router,
        .dispatcher and .layer (the MoE layer module). Put hooks here; gate them with the
        session's `gate.should_count(router)`."""

    def detach(self) -> None:
        """Remove every hook attach() put (the session is closing or the probe is off)."""

    def step(self) -> None:
        """Host only, after each counted training iteration (no device sync)."""

    def device_parts(self) -> list[torch.Tensor]:
        """1-D int64 or float64 device tensors to SUM over all ranks at the flush."""

    def read(self, reduced: list[torch.Tensor], snapshot: Snapshot) -> None:
        """The reduced CPU tensors, in device_parts() order; store results in
        snapshot.extras[self.name] (plain JSON-able data)."""

    def reset(self) -> None:
        """Start a new interval."""


class PhaseTimer(Protocol):
    """Timers that contribute `timing_ms` to a snapshot (megatron/timing.DispatcherTimer)."""

    meta: dict

    def step(self) -> None: ...

    def read_and_reset(self, rows: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def remove(self) -> None: ...


class CountingGate:
    """Which router calls count: training forwards, not recomputation, inside an iteration
    (once a loop says where its iterations are), and graph-capture aware: under CUDA-graph
    capture the hook's kernels are captured and each replay counts the pass it runs.

    What can be known per iteration (enabled, inside an iteration) is folded into one boolean,
    `open`, when it changes; the hook pays for one attribute read plus the checks that can
    change between calls of one iteration (module.training, recomputation, capture, warm-up)."""

    def __init__(self, graph_warmup: Callable[[], bool] = lambda: False):
        self.enabled = True
        self.gated = False  # outside a gated loop every training forward counts
        self.in_step = True
        self.captured = False  # set when a hook ran under CUDA-graph capture
        self.open = True
        self._graph_warmup = graph_warmup
        self._cuda = torch.cuda.is_available()
        self._capturing = torch._C._cuda_isCurrentStreamCapturing if self._cuda else (lambda: False)
        # `open` on the device, for kernels captured into CUDA graphs: a graph replays them with no
        # Python, also where nothing counts (Megatron's local graphs replay the training graph for
        # evaluation), so captured adds are multiplied by this flag. Set by `use_device`; one tiny
        # fill per gate change (two per iteration), never under capture.
        self.device_flag: Optional[torch.Tensor] = None

    def use_device(self, device) -> None:
        self.device_flag = torch.ones((), dtype=torch.long, device=device)

    def capture_flag(self) -> Optional[torch.Tensor]:
        """The device flag if this call is being captured into a CUDA graph, else None (eager: the
        Python gate decided already)."""
        return self.device_flag if self.captured and self._capturing() else None

    def _update(self) -> None:
        self.open = self.enabled and self.in_step
        if self.device_flag is not None and not self._capturing():  # a fill under capture would replay
            self.device_flag.fill_(int(self.open))

    def open_step(self) -> None:
        self.gated = True
        self.in_step = True
        self._update()

    def close_step(self) -> None:
        self.in_step = not self.gated
        self._update()

    def disable(self) -> None:
        self.enabled = False
        self._update()

    def capturing(self) -> bool:
        return self._cuda and self._capturing()

    def should_count(self, module) -> bool:
        # A recompute (Megatron's, Transformer Engine's, torch's non-reentrant checkpoint) runs
        # inside the autograd engine's backward pass: the router already counted those tokens.
        if not (self.enabled and module.training) or torch._C._current_graph_task_id() != -1:
            return False
        if self._cuda and self._capturing():
            # Captured kernels run once per replay, and each replay is a training pass;
            # the capture itself executes nothing.
            self.captured = True
            return True
        return self.in_step and not self._graph_warmup()


class ProbeSession:
    """The session: hooks + accumulator + timers + contributors + writers + the interval clock.
    Made by `open_session`; see the module docstring."""

    def __init__(self, hooks, accumulator: RoutingAccumulator, gate: CountingGate, settings: ProbeSettings,
                 writers=None):
        self.hooks = hooks
        self.accumulator = accumulator
        self.gate = gate
        self.settings = settings
        self.interval = settings.interval
        self.iterations = settings.iterations
        self.writers = writers
        self.timers: list[PhaseTimer] = []
        self.contributors: list = []
        self.reports_written = 0
        self.last_report: Optional[IntervalReport] = None
        self.alive = True
        self.stop_requested: Optional[str] = None  # a contributor's reason to end training
        self._skipped: list[int] = []  # iterations of this interval whose update was skipped
        self._reruns = 0  # forward/backward runs of this interval that were re-run and not counted

    # ---- setup -------------------------------------------------------------------------------

    @property
    def bindings(self):
        return self.hooks.bindings

    @property
    def layout(self):
        return self.accumulator.layout

    @property
    def domains(self) -> list[str]:
        return self.accumulator.domains

    @property
    def enabled(self) -> bool:
        return self.gate.enabled

    def add_contributor(self, contributor) -> None:
        """Attach an IntervalContributor (before training: its parts join every flush)."""
        contributor.attach(self.hooks.bindings)
        self.contributors.append(contributor)

    def add_timer(self, timer) -> None:
        self.timers.append(timer)

    def remove_timers(self) -> None:
        for timer in self.timers:
            timer.remove()
        self.timers.clear()

    def request_stop(self, reason: str) -> None:
        """Ask the training loop to stop at the end of this iteration (call it on every rank at the
        same iteration, e.g. from a contributor's read()). install() honours it; it is logged once."""
        if self.stop_requested is None:
            log.warning("moe-probe: stop requested: %s", reason)
            self.stop_requested = reason

    # ---- per iteration -----------------------------------------------------------------------

    def start_step(self) -> None:
        """Before one training iteration's forward/backward: from now on only router calls
        between start_step and after_step count (no evaluation, warm-up or capture passes)."""
        if self.alive:
            self.gate.open_step()

    def end_step_without_counting(self) -> None:
        """The iteration raised: close the gate, count nothing more until the next start_step."""
        self.gate.close_step()

    def restart_step(self) -> None:
        """The iteration's forward/backward runs again (Megatron's rerun state machine): drop the
        counts of the run before, so the iteration is counted once."""
        if self.alive:
            self.accumulator.discard_current()
            self._reruns += 1

    def set_batch_domains(self, dataset_ids, seq_length: int) -> None:
        """Before a micro-batch's forward: its dataset id per sample (`batch["dataset_id"]` of
        Megatron's BlendedDataset, shape [micro_batch]), and the sequence length. Device work
        only (a lookup, a tile, one copy into a fixed buffer); a no-op without domains."""
        if self.alive and self.accumulator.domains and dataset_ids is not None:
            try:
                self.accumulator.set_sample_domains(dataset_ids, seq_length, frozen=self.gate.captured)
            except Exception as exc:
                self.fail(exc)

    def step(self) -> None:
        """Close the iteration on the device and host (no flush). Steps are counted even when
        the probe is off after an error, so every rank's history keeps the same shape."""
        self.accumulator.step()
        for timer in self.timers:
            timer.step()
        for c in self.contributors:
            c.step()

    def after_step(self, iteration: int, skipped: bool = False) -> Optional[IntervalReport]:
        """Once per training iteration, with the number of completed iterations; `skipped` when
        the framework did not apply the update (the tokens were still routed, and are counted)."""
        if not self.alive:
            return None
        try:
            self.gate.close_step()
            if skipped:
                self._skipped.append(iteration)
            self.step()
        except Exception as exc:  # never raise into training
            self._die(exc)
            return None
        if iteration % self.interval == 0:
            return self.flush(iteration)
        return None

    def fail(self, exc: BaseException) -> None:
        """A hook failed: count nothing more on this rank; every rank learns it at the next flush."""
        if self.gate.enabled:
            log.warning("moe-probe: disabled after an error in a hook (training continues): %r", exc)
        self.gate.disable()
        self.accumulator.failed = True

    # ---- per interval ------------------------------------------------------------------------

    def snapshot(self, step: Optional[int] = None) -> Snapshot:
        """Reduce over all ranks, copy to the host once per dtype, reset the interval (collective)."""
        import torch.distributed as dist

        acc = self.accumulator
        groups = [acc.device_parts()] + [c.device_parts() for c in self.contributors]
        reduced = _reduce_by_dtype(groups, acc.device, dist)
        snap = acc.read(reduced[0], step)
        rows = torch.tensor([layer - 1 for layer in snap.layers], dtype=torch.long)
        for timer in self.timers:
            snap.timing_ms.update(timer.read_and_reset(rows))
            snap.meta.update(timer.meta)
        for contributor, parts in zip(self.contributors, reduced[1:]):
            contributor.read(parts, snap)
            contributor.reset()
        snap.meta.update(self.hooks.run_meta())
        snap.meta["probe_enabled"] = self.gate.enabled
        acc.reset()
        return snap

    def flush(self, iteration: int) -> Optional[IntervalReport]:
        """Reduce, summarize and write the interval so far (collective). No-op if empty."""
        if not self.alive or self.accumulator.steps_in_interval == 0:
            return None
        from megatron_moe_probe.summarize import build_report

        try:
            snap = self.snapshot(step=iteration)  # the collective part
        except Exception as exc:
            self._die(exc)
            return None
        snap.meta.update(skipped_iterations=self._skipped, reruns=self._reruns)
        self._skipped, self._reruns = [], 0
        try:
            report = build_report(snap, keep_iterations=self.iterations != "off")  # local: on failure skip this report but stay in step with
        except Exception as exc:  # the other ranks, which will all-reduce again next interval
            log.warning("moe-probe: could not summarize the interval ending at %d: %r", iteration, exc)
            return None
        if report.meta.get("ranks_failed"):
            log.warning("moe-probe: %d rank(s) disabled their probe after an error; counts are incomplete",
                        report.meta["ranks_failed"])
        self.last_report = report
        for callback in report_callbacks:
            try:
                callback(self, report)
            except Exception as exc:
                log.warning("moe-probe: a report callback failed: %r", exc)
        if self.writers is not None:
            self.writers.write(report)  # WriterSet isolates failing writers
        self.reports_written += 1
        return report

    def close(self, iteration: Optional[int] = None) -> None:
        if iteration is not None:
            self.flush(iteration)
        self.alive = False
        self.detach()
        if self.writers is not None:
            self.writers.close()

    def detach(self) -> None:
        """Remove every hook and timer (counters keep what they have)."""
        self.gate.disable()
        for part in (self.remove_timers, self.hooks.detach, *(c.detach for c in self.contributors)):
            try:
                part()
            except Exception as exc:
                log.warning("moe-probe: detach failed: %r", exc)
        if self.gate.captured:  # the contributors' hooks run under capture too (same gate)
            _keep_alive(self.accumulator, self.gate, *self.contributors)  # the gate: its device flag

    def _die(self, exc: BaseException) -> None:
        log.warning("moe-probe: stopped after an error (training continues): %r", exc)
        self.alive = False
        self.detach()


# Accumulators and contributors whose hook kernels were captured into a CUDA graph: a graph holds
# raw pointers to their buffers and may replay after detach, so the buffers must outlive the session.
_CAPTURED: list = []


def _keep_alive(*owners) -> None:
    _CAPTURED.extend(o for o in owners if not any(o is kept for kept in _CAPTURED))


def _reduce_by_dtype(groups: list[list[torch.Tensor]], device, dist) -> list[list[torch.Tensor]]:
    """Sum every tensor of every group over all ranks: one all-reduce and one device->host copy
    per dtype (int64, float64), then the groups split back apart, in order."""
    out: list[list[Optional[torch.Tensor]]] = [[None] * len(g) for g in groups]
    for dtype in (torch.long, torch.float64):
        items = [(gi, pi, p) for gi, g in enumerate(groups) for pi, p in enumerate(g) if p.dtype == dtype]
        if not items:
            continue
        flat = torch.cat([p.reshape(-1).to(device) for _, _, p in items])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        flat = flat.cpu()  # the one device->host copy of this dtype
        at = 0
        for gi, pi, p in items:
            out[gi][pi] = flat[at:at + p.numel()].view(p.shape)
            at += p.numel()
    bad = [(gi, pi) for gi, g in enumerate(out) for pi, p in enumerate(g) if p is None]
    if bad:
        raise TypeError("interval parts must be int64 or float64 tensors")
    return out  # type: ignore[return-value]


def open_session(model_chunks, settings: ProbeSettings, *, run_meta: Optional[dict] = None, writer: bool = True,
                 resumed: Optional[bool] = None, domains: Optional[list[str]] = None,
                 dataset_to_domain: Optional[list[int]] = None, tensorboard_writer: Any = None,
                 wandb_writer: Any = None, wandb_project: Optional[str] = None, hooks_factory=None,
                 announce: Optional[str] = None) -> ProbeSession:
    """The one way to make a session: attach hooks to `model_chunks`, allocate the accumulator,
    add the timers the settings ask for, then open the writers (on the rank with `writer`).

    Attaching comes first, so a model the probe cannot read leaves no run folder or open writer.
    run_meta: the run description for the writers (None: no writers at all, e.g. tests).
    resumed: None writes into settings.out_dir as is; True/False applies the training-run folder
    rule (record.training_run_folder: a fresh run never mixes into another run's folder).
    hooks_factory: (model_chunks, gpus_per_node) -> framework hooks; default Megatron-Core's.
    announce: log "moe-probe: on<announce>, every N iterations, writers ... -> folder" once."""
    if hooks_factory is None:
        from megatron_moe_probe.megatron.hooks import MegatronRouterHooks as hooks_factory
    hooks = hooks_factory(model_chunks, gpus_per_node=settings.gpus_per_node)
    try:
        accumulator = RoutingAccumulator(hooks.layout, device=hooks.device, history_steps=settings.history,
                                         track_capacity=hooks.capacity, domains=domains,
                                         iteration_matrix=settings.iterations == "matrix")
        if domains and dataset_to_domain is not None:
            accumulator.set_domain_table(dataset_to_domain)
        gate = CountingGate(hooks.graph_warmup)
        gate.use_device(hooks.device)
        session = ProbeSession(hooks, accumulator, gate, settings)
        hooks.attach(accumulator, gate, session.fail)
        if settings.timing:
            session.add_timer(hooks.make_timer(gate, every=settings.timing_every,
                                               backward=settings.timing == "all"))
        make_checks = getattr(hooks, "make_checks", None)  # integrity and router health (issue 23)
        if make_checks is not None:
            for contributor in make_checks(gate, settings, request_stop=session.request_stop, announce=writer):
                session.add_contributor(contributor)
    except BaseException:
        hooks.detach()
        raise
    if run_meta is not None:
        from megatron_moe_probe.writers.base import make_writers

        out_dir = settings.out_dir
        if writer and "local" in settings.writers and resumed is not None:
            from megatron_moe_probe.record import training_run_folder

            try:
                out_dir = str(training_run_folder(out_dir, resumed=resumed))
            except OSError as exc:
                log.warning("moe-probe: cannot prepare %s (%s)", out_dir, exc.strerror or exc)
            if out_dir != settings.out_dir and isinstance(run_meta.get("probe"), dict):
                run_meta["probe"]["out_dir"] = out_dir
        session.writers = make_writers(settings.writers, out_dir, run_meta if writer else None,
                                       rank=0 if writer else 1, heatmap_every=settings.heatmap_every,
                                       tensorboard_writer=tensorboard_writer, wandb_writer=wandb_writer,
                                       wandb_project=wandb_project)
        if writer and announce is not None:  # one line on the writing rank: where the records go
            log.warning("moe-probe: on%s, every %d iterations, writers %s -> %s", announce, settings.interval,
                        ",".join(session.writers.names) or "none", out_dir)
    for callback in session_callbacks:
        callback(session)
    return session
