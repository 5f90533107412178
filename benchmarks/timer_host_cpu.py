"""Where the dispatcher timer's host time goes, piece by piece, on CPU (no GPU needed).

On 2xH200 the timer's wrappers and backward hooks cost ~0.2 ms of host time per wrapped
call, while its CUDA event records took ~2.3 us each (docs/performance.md). This runs the
real Megatron MoE layers and alltoall dispatcher on CPU over gloo (2 ranks, 4 MoE layers;
the CPU harness stands in for CUDA events with the host clock) and splits the timer's
host time, measured as the GPU benchmark does (wrapper time minus the dispatcher call,
plus the backward hooks), into its parts: should_time, the event pool, _first_tensor and
_time_backward (which registers the two backward hooks). What is left is the hooks
themselves as autograd runs them.

    python benchmarks/timer_host_cpu.py [--steps 20] [--forward-only]
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from collections import defaultdict
from pathlib import Path


def _clocked(owner, name, acc):
    original = getattr(owner, name)

    def clocked(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            acc[name] += time.perf_counter() - t0

    setattr(owner, name, clocked)


def rank_job(rank, world, steps, backward):
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import probe_overhead

    from megatron_moe_probe.cpu import cluster as cc
    from megatron_moe_probe.megatron import timing
    from megatron_moe_probe.session import open_session
    from megatron_moe_probe.settings import ProbeSettings

    acc = defaultdict(float)
    _clocked(timing.DispatcherTimer, "_time_backward", acc)
    _clocked(timing._EventPool, "take", acc)
    _clocked(timing, "_first_tensor", acc)
    bench = types.SimpleNamespace(mode="timing", timing_host_s=0.0, timing_calls=0, _prof=None)
    probe_overhead.Bench.patch_timer_accounting(bench)
    cfg = cc.TinyMoEConfig(ep=world, micro_batch_size=4, num_layers=4)
    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    # every=1: time every iteration (the per-call cost; sampling divides it by N on average)
    probe = open_session([model], ProbeSettings.create(1000, timing="all" if backward else "forward",
                                                       timing_every=1))
    _clocked(probe.gate, "should_count", acc)  # an instance attribute: the session's gate
    g = torch.Generator().manual_seed(rank)

    def step():
        tokens = torch.randint(0, cfg.vocab_size, (cfg.micro_batch_size, cfg.seq_length + 1), generator=g)
        cc.forward_backward(model, tokens[:, :-1], labels=tokens[:, 1:])
        probe.step()

    for _ in range(3):  # warm-up
        step()
    acc.clear()
    bench.timing_host_s, bench.timing_calls = 0.0, 0
    for _ in range(steps):
        step()
    calls = max(bench.timing_calls, 1)
    parts = {k: v * 1e6 / calls for k, v in acc.items()}
    total = bench.timing_host_s * 1e6 / calls
    return {"wrapped_calls": bench.timing_calls, "timer_us_per_call": total, **parts,
            "backward_hooks_and_rest": total - sum(parts.values())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--forward-only", action="store_true", help="time the forward calls only (--moe-probe-timing forward)")
    opts = p.parse_args()
    from megatron_moe_probe.cpu.cluster import run_ranks

    for k, v in run_ranks(rank_job, 2, opts.steps, not opts.forward_only)[0].items():
        print(f"{k:>26}: {v:.1f}" if isinstance(v, float) else f"{k:>26}: {v}")


if __name__ == "__main__":
    main()
