"""`bench-dispatch` on CPU: Megatron's real dispatchers over gloo, for the correctness check.

The production module (megatron/replay.py) never imports the CPU harness; this one installs
the CPU stand-ins (cpu/compat.py) in each rank and then runs the same `bench_rank`.
"""

from __future__ import annotations


def _cpu_rank(rank: int, world: int, spec) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_moe_probe.cpu import compat
    from megatron_moe_probe.megatron.replay import bench_rank

    compat.enable()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(expert_model_parallel_size=world, create_gloo_process_groups=False)
    return bench_rank(rank, world, spec)


def run_cpu(spec, ranks: int) -> list[dict]:
    """Spawn `ranks` gloo processes (cluster.run_ranks) for the correctness check."""
    from megatron_moe_probe.cpu.cluster import run_ranks

    return run_ranks(_cpu_rank, ranks, spec)
