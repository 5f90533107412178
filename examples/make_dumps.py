"""Remake the example dumps in examples/: Megatron's own routing recorders on the CPU MoE.

    PYTHONPATH=. python examples/make_dumps.py     # from the repository root, about 20 s

Megatron-Core's `RouterTracer` (what `--moe-routing-trace-path` turns on) and its
tokens-per-expert logger (`--save-tokens-per-expert-interval`, `ActivationLogger.save_tpe`) run
on a 2-layer, 8-expert top-2 GPTModel, EP=2 over gloo, 2 processes, 6 iterations of 2 micro-batches,
an evaluation pass every 2 iterations (RouterTracer sees it; the probe's import leaves it out).
The tokens-per-expert logger's hooks are Megatron's own (`ActivationLogger._make_tpe_hook`), but
Megatron registers them on Transformer Engine's `GroupedLinear` only, which does not run on CPU:
here they sit on the experts module and receive the same argument (the local experts' counts),
see tests/dump_jobs.py. On a GPU with TE, `--save-tokens-per-expert-interval N` writes the same files.
"""

from __future__ import annotations

import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the rank functions spawn imports


def main() -> int:
    import dump_jobs
    from megatron_moe_probe.cpu.cluster import TinyMoEConfig, run_ranks

    trace, save = os.path.join(HERE, "router_trace"), os.path.join(HERE, "_save")
    for path in (trace, save, os.path.join(HERE, "tokens_per_expert")):
        shutil.rmtree(path, ignore_errors=True)
    run_ranks(dump_jobs.megatron_dumps, 2, TinyMoEConfig(), trace, save, 6, 2, 2, 2)
    os.replace(os.path.join(save, "tokens_per_expert"), os.path.join(HERE, "tokens_per_expert"))
    shutil.rmtree(save)
    print(f"wrote {trace} and {os.path.join(HERE, 'tokens_per_expert')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
