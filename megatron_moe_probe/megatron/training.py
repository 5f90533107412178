"""The probe in Megatron-LM's training loop: `install()` for megatron.training.

Add the probe to a Megatron-LM pretraining script in two lines:

    from megatron_moe_probe.megatron import training as moe_probe
    moe_probe.install()                    # before pretrain(...)
    ... parse_and_validate_args(extra_args_provider=moe_probe.chain_args(my_provider))

`install()` wraps three functions of megatron.training.training (checked on 0.19):
`train` (open the session before the first iteration and before any CUDA-graph
capture; flush what is left when training ends, close the writers), `train_step`
(count the router calls of that iteration only; step the session; flush every
interval) and `save_checkpoint_and_time` (flush the partial interval before a
checkpoint). With `--moe-probe` absent it does nothing. Nothing the probe does
raises into training. The session itself (hooks, accumulator, timers, writers) is
session.py's, made by its one factory from the flags' ProbeSettings.

The counting contract: every iteration `train_step` runs is counted once, in the
record that reports it (`steps` = iterations whose tokens the record holds), from
the first iteration and after a resume. Evaluation, CUDA-graph warm-up and capture
passes and activation recomputation are not counted. An iteration whose update
Megatron skipped (loss scale, NaN) routed its tokens: it is counted and listed in
the record's `meta.skipped_iterations`; if Megatron re-ran an iteration's
forward/backward (its rerun state machine), only the last run is counted and the
record's `meta.reruns` says how many were dropped.

A stop request (`session.request_stop`, e.g. from an interval contributor's verdict) ends
training at that iteration boundary: after the iteration's flush, the session is closed and
train_step reports Megatron's own "should exit" (with a checkpoint when `--save` is set), so
Megatron leaves its loop the way its exit-signal handler does, with exit code STOP_EXIT_CODE.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Optional

from megatron_moe_probe.megatron.flags import add_probe_args, chain_args, flags_without_probe, resolve  # noqa: F401
from megatron_moe_probe.session import ProbeSession, open_session

log = logging.getLogger("megatron_moe_probe")

STOP_EXIT_CODE = 3  # the process's exit code when the probe asked training to stop


# ---- megatron.training integration ------------------------------------------------------------

_state: dict[str, Any] = {"installed": False, "session": None, "failed_setup": False}


def _make_session(model) -> Optional[ProbeSession]:
    from megatron.training import get_args

    from megatron_moe_probe.writers.meta import collect_run_meta

    args = get_args()
    if not getattr(args, "moe_probe", False):
        ignored = flags_without_probe(args)
        if ignored:
            log.warning("moe-probe: %s given without --moe-probe: the probe is off", ", ".join(ignored))
        return None
    settings = resolve(args)
    from megatron_moe_probe.megatron.hooks import group_rank_size

    rank, world = group_rank_size()
    writer = rank == world - 1  # Megatron's TensorBoard/wandb writers live on the last rank
    try:
        from megatron.training.global_vars import get_tensorboard_writer

        tb = get_tensorboard_writer()
    except Exception:
        tb = None
    try:
        domains, dataset_to_domain = blend_domains(args, settings.domains)
    except ValueError as exc:  # a bad --moe-probe-domains: count without domains rather than not at all
        log.warning("moe-probe: per-domain counts off: %s", exc)
        domains, dataset_to_domain = [], []
    meta = collect_run_meta(args, dispatcher=getattr(args, "moe_token_dispatcher_type", None),
                            extra={"probe": settings.to_dict(), "world_size": world,
                                   "domains": {"names": domains, "dataset_to_domain": dataset_to_domain,
                                               "datasets": blend_prefixes(args) if domains else []}})
    # One run per folder: a resumed run (Megatron loaded iteration > 0) appends to its own
    # folder; a fresh run never mixes its records into another run's (record.py decides).
    return open_session(model, settings, run_meta=meta, writer=writer,
                        resumed=(getattr(args, "iteration", 0) or 0) > 0, domains=domains,
                        dataset_to_domain=dataset_to_domain, tensorboard_writer=tb,
                        wandb_project=getattr(args, "wandb_project", None), announce="")


def blend_prefixes(args) -> Optional[list[str]]:
    """The training blend's dataset prefixes in the order of BlendedDataset's dataset ids
    (`--data-path`, or `--train-data-path`), or None."""
    try:
        from megatron.training.utils import get_blend_and_blend_per_split

        blend, per_split = get_blend_and_blend_per_split(args)
    except Exception:
        return None
    if blend is None and per_split is not None:
        blend = per_split[0]
    return list(blend[0]) if blend else None


def blend_domains(args, spec: Optional[str]) -> tuple[list[str], list[int]]:
    from megatron_moe_probe.settings import resolve_domains

    if getattr(args, "mock_data", False):
        return [], []
    return resolve_domains(blend_prefixes(args), spec)


def mark_forward_step_sets_domains() -> None:
    """The training script's forward step calls `set_batch_domains` itself (moe-probe train's
    worker does): do not also peek at the data iterator."""
    _state["forward_step_sets_domains"] = True


def current_session() -> Optional[ProbeSession]:
    """The session `install()` started, if any (for forward steps and callbacks)."""
    return _state["session"]


def set_batch_domains(dataset_ids, seq_length: int) -> None:
    """For forward steps and training callbacks (e.g. a Megatron-Bridge callback): the coming
    micro-batch's dataset id per sample. Does nothing without a session or without domains."""
    session = _state["session"]
    if session is not None:
        session.set_batch_domains(dataset_ids, seq_length)


def peek_batch_domains(data_iterator, session: ProbeSession, seq_length: int):
    """For scripts whose forward step does not call `set_batch_domains` (Megatron-LM's
    pretrain_gpt.py): make `data_iterator` hand each batch's `dataset_id` to the session as
    the batch is drawn, i.e. just before that micro-batch's forward. A RerunDataIterator keeps
    its class (Megatron checks it) through a subclass whose __next__ peeks, so replayed
    batches are labelled too; other iterators get a thin wrapper. Lists (virtual pipeline
    stages) are handled item by item. Idempotent."""
    if isinstance(data_iterator, list):
        return [peek_batch_domains(d, session, seq_length) for d in data_iterator]
    if data_iterator is None or getattr(data_iterator, "_moe_probe_peek", False):
        return data_iterator

    def peek(batch):
        if isinstance(batch, dict):
            session.set_batch_domains(batch.get("dataset_id"), seq_length)
        return batch

    try:
        from megatron.core.rerun_state_machine import RerunDataIterator
    except Exception:  # pragma: no cover
        RerunDataIterator = ()
    if RerunDataIterator and isinstance(data_iterator, RerunDataIterator):
        base = type(data_iterator)
        data_iterator.__class__ = type(base.__name__, (base,), {
            "__next__": lambda self: peek(base.__next__(self)), "_moe_probe_peek": True})
        return data_iterator
    return _PeekingIterator(data_iterator, peek)


class _PeekingIterator:
    _moe_probe_peek = True

    def __init__(self, inner, peek):
        self._inner, self._peek = inner, peek

    def __iter__(self):
        return self

    def __next__(self):
        return self._peek(next(self._inner))

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _session_for(model) -> Optional[ProbeSession]:
    if _state["session"] is None and not _state["failed_setup"]:
        try:
            _state["session"] = _make_session(model)
        except Exception as exc:  # a model without MoE layers, an unknown layout...: warn, train on
            _state["failed_setup"] = True
            log.warning("moe-probe: not started: %s", exc)
    return _state["session"]


def _forward_backward_position(args: tuple, kwargs: dict):
    """Where train_step's `forward_backward_func` is: ('kw', name) or ('pos', index into the
    arguments after model), or None (0.19: train_step(fsf, it, model, optimizer, scheduler,
    config, forward_backward_func, ...))."""
    if "forward_backward_func" in kwargs:
        return "kw"
    return 3 if len(args) > 3 else None


def _counting_forward_backward(session: ProbeSession, forward_backward_func):
    """forward_backward_func that tells the session when the iteration runs it again."""
    runs = [0]

    @functools.wraps(forward_backward_func)
    def run(*args, **kwargs):
        if runs[0]:
            session.restart_step()
        runs[0] += 1
        return forward_backward_func(*args, **kwargs)

    return run


def _skipped(out) -> bool:
    # 0.19 returns (loss_dict, skipped_iter, should_checkpoint, should_exit, ...).
    return bool(out[1]) if isinstance(out, tuple) and len(out) > 1 else False


def install() -> None:
    """Wrap megatron.training.training's train / train_step / save_checkpoint_and_time (idempotent)."""
    if _state["installed"]:
        return
    from megatron.training import training as mt

    original_step = mt.train_step
    original_save = mt.save_checkpoint_and_time
    original_train = mt.train

    @functools.wraps(original_step)
    def train_step(forward_step_func, data_iterator, model, *args, **kwargs):
        # Before the iteration runs, so that the first iteration is counted too.
        session = _session_for(model)
        if session is None:
            return original_step(forward_step_func, data_iterator, model, *args, **kwargs)
        where = _forward_backward_position(args, kwargs)
        if where == "kw":
            kwargs["forward_backward_func"] = _counting_forward_backward(session, kwargs["forward_backward_func"])
        elif where is not None:
            args = args[:where] + (_counting_forward_backward(session, args[where]),) + args[where + 1:]
        if session.domains and not _state.get("forward_step_sets_domains"):
            from megatron.training import get_args

            data_iterator = peek_batch_domains(data_iterator, session, get_args().seq_length)
        session.start_step()
        try:
            out = original_step(forward_step_func, data_iterator, model, *args, **kwargs)
        except BaseException:
            session.end_step_without_counting()
            raise
        iteration = kwargs.get("iteration")
        done = (iteration + 1) if iteration is not None else session.accumulator.step_number + 1
        session.after_step(done, skipped=_skipped(out))
        if session.stop_requested is not None:
            out = _stop(session, done, out)
        return out

    @functools.wraps(original_save)
    def save_checkpoint_and_time(iteration, *args, **kwargs):
        session = _state["session"]
        if session is not None:
            session.flush(iteration)  # the partial interval is on disk before the checkpoint
        return original_save(iteration, *args, **kwargs)

    @functools.wraps(original_train)
    def train(*args, **kwargs):
        # train(forward_step_func, model, ...): attach now, before Megatron captures any CUDA
        # graph (TE graphs are captured before the first train_step when warm-up steps are 0).
        model = kwargs.get("model", args[1] if len(args) > 1 else None)
        if model is not None:
            _session_for(model)
        result = original_train(*args, **kwargs)
        session = _state["session"]
        if session is not None:
            iteration = result[0] if isinstance(result, tuple) and result and isinstance(result[0], int) else None
            session.close(iteration if iteration is not None else session.accumulator.step_number)
            _state["session"] = None
        return result

    mt.train_step = train_step
    mt.save_checkpoint_and_time = save_checkpoint_and_time
    mt.train = train
    _state.update(installed=True, originals=(original_step, original_save, original_train))


def _stop(session: ProbeSession, iteration: int, out):
    """Turn the session's stop request into Megatron's own exit at this iteration boundary: the
    interval is flushed and the writers closed first (Megatron's exit path calls sys.exit inside
    train(), after which nothing of ours would run)."""
    log.warning("moe-probe: stopping training after iteration %d: %s", iteration, session.stop_requested)
    session.close(iteration)
    _state["session"] = None
    _state["failed_setup"] = True  # no new session for the iterations Megatron may still run
    if not (isinstance(out, tuple) and len(out) >= 5):
        return out  # an unknown train_step: leave its result alone
    from megatron.training import get_args

    should_checkpoint = bool(out[2]) or bool(getattr(get_args(), "save", None))
    return (out[0], out[1], should_checkpoint, True, STOP_EXIT_CODE, *out[5:])


def uninstall() -> None:
    if not _state["installed"]:
        return
    from megatron.training import training as mt

    mt.train_step, mt.save_checkpoint_and_time, mt.train = _state["originals"]
    _state.update(installed=False, session=None, failed_setup=False)


def add_flags_to_megatron_parser() -> None:
    """Make every parse of Megatron's arguments include the probe's flags, for scripts we do
    not edit. Rebinds `parse_args` in megatron.training.arguments and in every loaded module
    that imported it by name."""
    from megatron.training import arguments

    original = arguments.parse_args
    if getattr(original, "_moe_probe", False):
        return

    @functools.wraps(original)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return original(chain_args(extra_args_provider), ignore_unknown_args)

    parse_args._moe_probe = True
    for module in list(sys.modules.values()):
        if getattr(module, "parse_args", None) is original:
            module.parse_args = parse_args
    arguments.parse_args = parse_args


def run_script(argv: list[str]) -> None:
    """`python -m megatron_moe_probe.megatron.training SCRIPT [ARGS...]`: run an unmodified
    pretraining script (e.g. Megatron-LM's pretrain_gpt.py) with the probe's flags and hooks."""
    import os
    import runpy

    if not argv:
        raise SystemExit("usage: python -m megatron_moe_probe.megatron.training pretrain_gpt.py [megatron args]")
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"moe-probe: no such script: {script}")
    from megatron_moe_probe.megatron import quirks

    quirks.apply()
    add_flags_to_megatron_parser()
    install()
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    run_script(sys.argv[1:])
