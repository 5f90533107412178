"""Run real Megatron-Core 0.19 MoE layers on CPU over gloo (tests and the CPU demo).

Megatron-Core assumes CUDA in a handful of places that do not matter for the
maths: side streams, events, `current_device()`, the CUDA RNG tracker, and one
device->host helper. `enable()` swaps those for CPU stand-ins, process-wide and
idempotently. It is never used on a GPU run. Checked against megatron-core
0.19.2 / torch 2.11; each patch says why it is needed.
"""

from __future__ import annotations

import contextlib
import os

import torch

_ENABLED = False


class _NoOpStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NoOpStream)

    def __hash__(self):
        return 0


class _NoOpEvent:
    """Stands in for torch.cuda.Event; elapsed_time is measured on the host clock."""

    def __init__(self, enable_timing=False, *args, **kwargs):
        self._t = None

    def record(self, stream=None):
        import time

        self._t = time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        if self._t is None or end._t is None:
            raise RuntimeError("event not recorded")
        return (end._t - self._t) * 1000.0


_STREAM = _NoOpStream()


class CpuRNGStatesTracker:
    """Megatron's CudaRNGStatesTracker, on the CPU generator.

    `fork(name)` swaps the global CPU RNG state for the named one, so the
    tensor-/expert-parallel seeding scheme works unchanged.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def enable() -> None:
    """Install the CPU stand-ins (idempotent). Call before building a Megatron model."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available() and os.environ.get("MOE_PROBE_FORCE_CPU") != "1":
        raise RuntimeError("cpu_compat.enable() is for CPU-only runs; CUDA is available here")
    cuda = torch.cuda
    cuda.Stream = _NoOpStream  # side streams for shared experts / DtoH copies
    cuda.Event = _NoOpEvent  # events for overlap and for our own dispatcher timing
    cuda.current_stream = lambda *a, **k: _STREAM
    cuda.default_stream = lambda *a, **k: _STREAM
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = lambda *a, **k: None
    cuda.current_device = lambda: torch.device("cpu")  # used as a `device=` argument
    cuda.is_current_stream_capturing = lambda: False
    torch.Tensor.record_stream = lambda self, stream: None

    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # Upstream bug (moe_utils.py ~1184): a tensor already on CPU is returned as a tensor
    # even when the caller asked for numpy.
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        out = original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(out):
            out = out.numpy()
        return out

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # CUDA RNG tracker -> CPU generator; the CUDA state helpers become no-ops.
    mc_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mc_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mc_random.initialize_rng_tracker = lambda *a, **k: None
    mc_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mc_random._set_cuda_rng_state = lambda *a, **k: None
    _allow_sequence_parallel_torch_norm()
    _gloo_friendly_sequence_parallel_collectives()
    _ENABLED = True


def _gloo_friendly_sequence_parallel_collectives() -> None:
    """Gloo cannot all-gather tensors of unequal sizes (the alltoall dispatcher's TP gather
    has them) nor reduce-scatter. Same results, built from what gloo has: pad-and-gather,
    and all-reduce-then-slice."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        world = group.size()
        if world == 1:
            return input_
        sizes = output_split_sizes or [input_.shape[0]] * world
        rows = max(sizes)
        padded = input_.new_zeros((rows, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        world = group.size()
        if world == 1:
            return input_
        sizes = input_split_sizes or [input_.shape[0] // world] * world
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def _allow_sequence_parallel_torch_norm() -> None:
    """The local spec's torch norm refuses sequence parallelism (torch_norm.py asserts). The
    norm itself is per token, so it is correct on a sequence shard; mark its parameters
    `sequence_parallel` so the CPU harness sums their gradients over TP, as Megatron's DDP does."""
    import dataclasses

    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        module = original_new(cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, *args, **kwargs)
        for p in module.parameters():
            p.sequence_parallel = True
        return module

    torch_norm.WrappedTorchNorm.__new__ = __new__
