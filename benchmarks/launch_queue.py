"""Host time of one CUDA call with the GPU idle and with its launch queue full (GPU).

The probe's host-time accounting (benchmarks/probe_overhead.py) charges every CUDA
call a hook makes. In a GPU-bound training loop the host runs ahead until the
launch queue is full; from then on every call waits for room, about one kernel's
duration, whoever makes it. This measures that wait for the calls the probe makes:
a CUDA event record (dispatcher timing) and the statistics' sum + in-place add.

    python benchmarks/launch_queue.py [--out FILE.json]
Prints median microseconds per call, idle vs queue full, side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed_calls(call, n: int, between=None) -> list[float]:
    """Host microseconds of `call`, n times; `between` runs untimed before each call."""
    out = []
    for _ in range(n):
        if between is not None:
            between()
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--calls", type=int, default=400)
    opts = p.parse_args()
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    routing = torch.rand(8192, 32, device=dev) > 0.875  # a router's [tokens, experts] map
    acc = torch.zeros(32, dtype=torch.int64, device=dev)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(opts.calls)]
    it = iter(events * 4)

    def record():
        next(it).record()

    def stats():
        acc.add_(routing.sum(0))

    def matmul():
        torch.mm(a, b)

    for _ in range(20):
        matmul()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        matmul()
    end.record()
    end.synchronize()
    kernel_us = start.elapsed_time(end) / 50 * 1000

    results = {"matmul_kernel_us": kernel_us}
    for name, call in (("event_record", record), ("sum_add", stats), ("matmul_launch", matmul)):
        idle = timed_calls(call, opts.calls, between=torch.cuda.synchronize)
        for _ in range(3000):  # fill the launch queue: far more work queued than it can hold
            matmul()
        full = timed_calls(call, opts.calls, between=matmul)
        torch.cuda.synchronize()
        results[name] = {"idle_us": statistics.median(idle), "queue_full_us": statistics.median(full)}
    print(f"matmul kernel: {kernel_us:.0f} us")
    print(f"{'call':<16}{'GPU idle (us)':>16}{'queue full (us)':>18}")
    for name in ("event_record", "sum_add", "matmul_launch"):
        r = results[name]
        print(f"{name:<16}{r['idle_us']:>16.1f}{r['queue_full_us']:>18.1f}")
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
