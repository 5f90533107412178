"""The probe as a Megatron-Bridge training callback:

    from megatron_moe_probe.megatron.bridge import MoEProbeCallback
    pretrain(cfg, forward_step, callbacks=[MoEProbeCallback(interval=10, writers=["local", "wandb"])])

No import of Megatron-Bridge: Bridge's `CallbackManager.add` registers any object's `on_*`
methods that are not the base `Callback`'s, so a plain class works. Where Bridge 0.6.2's
`train()` (megatron/bridge/training/train.py) fires the events, and what we do there:

  on_train_start       after the model, optimizer and data exist  -> attach to context.model
  on_train_step_start  before the iteration's forward/backward    -> session.start_step()
  on_train_step_end    after it, BEFORE `train_state.step += 1`   -> session.after_step(step + 1)
  on_checkpoint_save   inside save_checkpoint, every rank          -> flush (collective)
  on_train_end         after the loop                             -> close (last flush, writers)

So the iteration that just finished is `state.train_state.step + 1` in on_train_step_end (the
1-based count Megatron logs), and evaluation (`evaluate_and_print_results`, after the increment,
between two steps) runs outside start_step/after_step and is never counted. Writers live on the
last rank, where Bridge keeps `state.tensorboard_logger` and `state.wandb_logger`; those are
reused when they exist, as the Megatron-LM path reuses Megatron's. Every event handler catches
everything: a probe failure logs one warning and switches the probe off; training goes on.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterable, Optional

from megatron_moe_probe.settings import (DEFAULT_HEATMAP_EVERY, DEFAULT_INTEGRITY, DEFAULT_INTEGRITY_PAYLOAD_EVERY,
                                        DEFAULT_TIMING_EVERY, ProbeSettings)

log = logging.getLogger("megatron_moe_probe")


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _get(obj: Any, *path: str) -> Any:
    """obj.a.b... or None where a link is missing (Bridge's config is nested dataclasses)."""
    for name in path:
        obj = getattr(obj, name, None) if obj is not None else None
    return obj


class MoEProbeCallback:
    """Per-layer routing statistics for Megatron-Bridge training (see the module docstring)."""

    def __init__(self, interval: int = 10, writers: Iterable[str] | str | None = None, out_dir: Optional[str] = None,
                 *, gpus_per_node: Optional[int] = None, timing: bool | str | None = False,
                 heatmap_every: int = DEFAULT_HEATMAP_EVERY, history: Optional[int] = None,
                 timing_every: int = DEFAULT_TIMING_EVERY, integrity: str = DEFAULT_INTEGRITY,
                 integrity_payload_every: int = DEFAULT_INTEGRITY_PAYLOAD_EVERY) -> None:
        from megatron_moe_probe.writers.base import parse_writer_names

        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = interval
        self.writer_names = parse_writer_names(writers)  # a typo fails here, before training starts
        self.out_dir = out_dir
        self.gpus_per_node = gpus_per_node
        self.timing = timing
        self.heatmap_every = heatmap_every
        self.history = history
        self.timing_every = timing_every
        self.integrity, self.integrity_payload_every = integrity, integrity_payload_every
        # Every default filled the one way (settings.py), and a bad value fails here, before training.
        self.settings = self._settings(out_dir or "")
        self.session = None
        self.last_iteration: Optional[int] = None  # the last iteration given to after_step

    # -- events ---------------------------------------------------------------------------------

    def on_train_start(self, context: Any) -> None:
        self._guard("on_train_start", self._start, context)

    def on_train_step_start(self, context: Any) -> None:
        if self.session is not None:
            self._guard("on_train_step_start", self._step_start)

    def on_train_step_end(self, context: Any) -> None:
        if self.session is not None:
            self._guard("on_train_step_end", self._step_end, context)

    def on_checkpoint_save(self, context: Any) -> None:
        if self.session is not None and self.last_iteration is not None:
            self._guard("on_checkpoint_save", self.session.flush, self.last_iteration)

    def on_train_end(self, context: Any) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            self._guard("on_train_end", session.close, self.last_iteration)

    # -- work -----------------------------------------------------------------------------------

    def _guard(self, event: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - never raise into Bridge's training loop
            log.warning("moe-probe: %s failed (%r); the probe is off, training continues", event, exc)
            session, self.session = self.session, None
            if session is not None:
                try:
                    session.close()
                except Exception:  # noqa: BLE001
                    pass

    def _settings(self, out_dir: str) -> ProbeSettings:
        return ProbeSettings.create(self.interval, writers=self.writer_names, out_dir=out_dir, timing=self.timing,
                                    gpus_per_node=self.gpus_per_node, history=self.history,
                                    heatmap_every=self.heatmap_every, timing_every=self.timing_every,
                                    integrity=self.integrity, integrity_payload_every=self.integrity_payload_every)

    def _start(self, context: Any) -> None:
        from megatron_moe_probe.session import open_session

        state = context.state
        rank, world = _dist()
        writing = rank == world - 1  # Bridge's TensorBoard and wandb loggers live on the last rank
        self.settings = settings = self._settings(self.out_dir or self._default_dir(state))
        existing = {}
        if writing and "tensorboard" in self.writer_names:
            existing["tensorboard_writer"] = _get(state, "tensorboard_logger")
        if writing and "wandb" in self.writer_names:
            existing["wandb_writer"] = _get(state, "wandb_logger")
        step = _get(state, "train_state", "step")
        self.session = open_session(list(context.model), settings, run_meta=self._run_meta(context, world),
                                    writer=writing, resumed=bool(step), announce=" (Megatron-Bridge callback)",
                                    wandb_project=_get(state, "cfg", "logger", "wandb_project"), **existing)

    def _step_start(self) -> None:
        self.session.start_step()  # counting opens: only this iteration's forward/backward counts

    def _step_end(self, context: Any) -> None:
        iteration = int(context.state.train_state.step) + 1  # Bridge increments the step after this event
        skipped = bool(getattr(context, "skipped_iter", False))
        self.session.after_step(iteration, skipped=skipped)
        self.last_iteration = iteration

    def _default_dir(self, state: Any) -> str:
        save = _get(state, "cfg", "checkpoint", "save")
        if save:
            return os.path.join(str(save), "moe_probe")
        return os.path.join("moe_probe_runs", time.strftime("%Y%m%d-%H%M%S"))

    def _run_meta(self, context: Any, world: int) -> dict:
        from megatron_moe_probe.writers.meta import collect_run_meta

        chunk = context.model[0] if context.model else None
        config = _get(chunk, "config") or _get(chunk, "module", "config")
        cfg = _get(context.state, "cfg")
        args = {name: _get(config, name) for name in (
            "moe_token_dispatcher_type", "moe_flex_dispatcher_backend", "expert_model_parallel_size",
            "tensor_model_parallel_size", "context_parallel_size", "pipeline_model_parallel_size",
            "num_moe_experts", "moe_router_topk", "hidden_size", "num_layers", "bf16", "fp16")}
        args["micro_batch_size"] = _get(cfg, "train", "micro_batch_size")
        args["seq_length"] = _get(cfg, "model", "seq_length") or _get(cfg, "dataset", "sequence_length")
        args["moe_probe_gpus_per_node"] = self.gpus_per_node
        return collect_run_meta({k: v for k, v in args.items() if v is not None},
                                extra={"framework": "megatron-bridge", "world_size": world,
                                       "probe": self.settings.to_dict()})
