"""Dispatch integrity and router health on the GPU: what they cost, and that they see faults.

    python benchmarks/integrity_cost.py micro --out DIR [--repeats 31 --calls 20]
    python benchmarks/integrity_cost.py train --out DIR [--recipe tiny-gpu:1gpu --iters 20 --interval 5]

micro: the check's own hook bodies (megatron/exchange_check.py) and the router-health
accumulator on one MoE layer of the Qwen3-30B-A3B shape (4096 tokens, hidden 2048, 128
experts, top-8, bf16; 32768 dispatched rows), as the alltoall dispatcher hands them over:
count check only, count + payload check, router health; and one side's row fingerprint alone,
three ways (the int8 GEMM at width 8 as used, at width 32, and int32-word products), to choose
a cheaper exact fingerprint. Host time per layer call (issuing
the kernels) and GPU time (CUDA events around `--calls` calls), median and 95% interval of
the median over `--repeats` samples, all in one process; beside them, a dense proxy of the
same layer's expert GEMMs (fc1 2048x1536 and fc2 768x2048 over 32768 rows, forward only).

train: the real training path (`moe-probe train`'s worker: Megatron's pretrain -> train ->
train_step, the probe on with its default `--moe-probe-integrity warn`, plus the payload
fingerprint on one iteration in 8: `--moe-probe-integrity-payload-every 8`), once clean and once
with one bit flipped in the rows `token_dispatch` hands on in one layer of one iteration. Writes DIR/integrity_train.json with each
interval's verdict; prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
T, H, E, K = 4096, 2048, 128, 8


def _median_ci(values: list[float]) -> dict:
    """Median and a distribution-free 95% interval of the median (order statistics)."""
    v = sorted(values)
    n = len(v)
    lo = max(0, int(n / 2 - 0.98 * n ** 0.5))
    hi = min(n - 1, int(n / 2 + 0.98 * n ** 0.5))
    return {"median": statistics.median(v), "ci95": [v[lo], v[hi]], "n": n}


def _aten_ops(fn) -> int:
    """ATen operators one call issues (each a kernel launch or a host-side tensor op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def micro(out: str, repeats: int, calls: int) -> dict:
    import torch

    from megatron_moe_probe.integrity import fingerprint_weights
    from megatron_moe_probe.megatron.exchange_check import ExchangeCheck, _Call
    from megatron_moe_probe.router_health import RouterHealthAccumulator

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(T, E, device=dev, generator=g).to(torch.bfloat16)
    routing_map = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, logits.float().topk(K, 1).indices, True)
    rows = torch.randn(T * K, H, device=dev, generator=g).to(torch.bfloat16)
    per_expert_host = routing_map.sum(0).cpu()  # Megatron's alltoall hands tokens_per_expert over on the host
    dispatcher = SimpleNamespace(tp_size=1, ep_size=1, tp_rank=0, drop_and_pad=False, capacity=None,
                                 routing_map=routing_map, local_expert_indices=list(range(E)), num_local_experts=E,
                                 num_global_tokens_per_local_expert=per_expert_host.view(1, E))
    binding = SimpleNamespace(slot=0, router=None, dispatcher=dispatcher)
    health = RouterHealthAccumulator(1, E, dev)

    def layer_call(check):
        state = _Call()
        check._dispatch_preprocess(binding, dispatcher, state, (), (rows, None))
        check._dispatch_postprocess(binding, dispatcher, state, (), (rows, per_expert_host, None))
        check._combine_preprocess(binding, dispatcher, state, (), rows)
        check._combine_postprocess(binding, dispatcher, state, (rows,), rows)

    def make(payload: bool):
        check = ExchangeCheck(lambda r: True, num_slots=1, num_experts=E, ep_size=1, device=dev,
                              payload_every=1 if payload else 10 ** 9)
        if not payload:
            check.iteration = 1  # iteration 0 is always a payload iteration
        return lambda: layer_call(check)

    w1 = torch.randn(H, 2 * 768, device=dev, generator=g).to(torch.bfloat16)
    w2 = torch.randn(768, H, device=dev, generator=g).to(torch.bfloat16)

    def experts_proxy():
        h = rows @ w1
        return h[:, :768] @ w2

    # Candidates for a cheaper exact row fingerprint (one side of the payload check, 32768 rows):
    # the int8 GEMM at the width in use (8), the same GEMM at width 32 (cuBLASLt's int8 kernels
    # may want a wider N), and two lanes of wrapped int32 products of the rows' 32-bit words
    # summed in int64 (exact modulo 2^64, a flipped bit always changes an odd weight's product).
    as_bytes = rows.reshape(rows.shape[0], -1).view(torch.int8)
    w8 = fingerprint_weights(as_bytes.shape[1], dev)
    w32 = torch.cat([w8] * 4, 1).contiguous().t().contiguous().t()  # [B, 32], column-major like w8
    words = rows.reshape(rows.shape[0], -1).view(torch.int32)
    lanes = torch.randint(-2**30, 2**30, (2, words.shape[1]), generator=torch.Generator().manual_seed(1),
                          dtype=torch.int32).to(dev) * 2 + 1  # odd

    def words_fingerprint():
        return torch.stack([(words * lane).sum(1, dtype=torch.int64) for lane in lanes], 1)

    variants = {
        "count_check": make(False),
        "count_and_payload_check": make(True),
        "router_health": lambda: health.record(0, logits, routing_map, topk=K, score_function="softmax"),
        "expert_gemms_forward_proxy": experts_proxy,
        "fingerprint_int_mm_n8": lambda: torch._int_mm(as_bytes, w8),
        "fingerprint_int_mm_n32": lambda: torch._int_mm(as_bytes, w32),
        "fingerprint_int32_words_2_lanes": words_fingerprint,
    }
    cuda = dev.type == "cuda"
    ops = {name: _aten_ops(fn) for name, fn in variants.items()}  # also warms the weight cache
    for fn in variants.values():  # warm-up: weights cached, kernels loaded
        for _ in range(3):
            fn()
    if cuda:
        torch.cuda.synchronize()
    samples = {name: {"host_us": [], "gpu_us": []} for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():  # interleaved, so drift hits every variant alike
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            host = (time.perf_counter() - t0) / calls * 1e6
            if cuda:
                end.record()
                end.synchronize()
                samples[name]["gpu_us"].append(start.elapsed_time(end) * 1e3 / calls)
            samples[name]["host_us"].append(host)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "shape": {"tokens": T, "hidden": H, "experts": E, "topk": K, "dtype": "bf16", "rows": T * K},
        "repeats": repeats, "calls_per_sample": calls,
        "per_layer_call": {name: {k: _median_ci(v) for k, v in s.items() if v} for name, s in samples.items()},
        "aten_ops_per_layer_call": ops,
    }
    with open(os.path.join(out, "integrity_micro.json"), "w") as f:
        json.dump(result, f, indent=1)
    for name, stats in result["per_layer_call"].items():
        print(f"{name:28s} {ops[name]:3d} aten ops   host {stats['host_us']['median']:8.1f} us"
              + (f"   gpu {stats['gpu_us']['median']:8.1f} us" if "gpu_us" in stats else ""))
    return result


# ---- train: the real training path, clean and with one fault ------------------------------------

def worker(out: str, fault: str, megatron_argv: list[str]) -> int:
    """One training process on the production path: the session that install() opens carries the
    integrity check and router health (`--moe-probe-integrity warn`, the default); this adds an
    optional fault LAYER:ITERATION and keeps each report's blocks."""
    import torch
    import torch.distributed as dist

    from megatron_moe_probe import session as probe_session
    from megatron_moe_probe.megatron import launch

    records, state = [], {}

    def on_session(session):
        check = next(c for c in session.contributors if c.name == "integrity")
        state["check"] = check
        if fault:
            layer, iteration = (int(x) for x in fault.split(":"))
            binding = next(b for b in session.bindings if b.slot == layer - 1)
            original = binding.dispatcher.token_dispatch

            def faulty(*args, **kwargs):
                out = original(*args, **kwargs)
                if check.iteration == iteration - 1 and torch.is_grad_enabled() and not state.get("done"):
                    state["done"] = True
                    rows = out[0].clone()
                    rows.view(torch.int16)[0, 0] ^= 1 << 3
                    return (rows, *out[1:])
                return out

            binding.dispatcher.__dict__["token_dispatch"] = faulty

    def on_report(session, report):
        extras = report.meta.get("extras", {})
        records.append({"step": report.step, "steps": report.steps, "integrity": extras.get("integrity"),
                        "router_health": extras.get("router_health"),
                        "per_layer": [{k: row.get(k) for k in ("maxvio", "score_entropy", "topk_margin",
                                                                 "aux_load_tv", "tpe_p50", "tpe_max")}
                                      for row in report.per_layer],
                        "probe_tokens": sum(map(sum, report.tokens_per_expert))})

    probe_session.session_callbacks.append(on_session)
    probe_session.report_callbacks.append(on_report)
    code = launch.main(megatron_argv)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(records, f, default=str)
    return code


def train(out: str, recipe: str, iters: int, interval: int, fault_at: str, timeout: int) -> dict:
    sys.path.insert(0, HERE)
    from counting_modes import megatron_args

    results = {}
    for name, fault in (("clean", ""), ("bitflip", fault_at)):
        run_dir = os.path.join(out, f"run_{name}")
        truth = os.path.join(out, f"integrity_{name}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               os.path.abspath(__file__), "--worker", truth, fault, "--",
               *megatron_args(recipe, ["--transformer-impl", "local"], iters, interval, run_dir),
               "--moe-probe-integrity-payload-every", "8"]  # the fingerprint is off by default
        start = time.time()
        with open(os.path.join(out, f"train_{name}.log"), "w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        records = json.load(open(truth)) if os.path.exists(truth) else []
        results[name] = {"rc": rc, "seconds": round(time.time() - start, 1), "fault": fault, "records": records}
        caught = [(r["step"], v["check"], v["layer"], v["expert"]) for r in records
                  for v in r["integrity"]["violations"]]
        print(f"{name}: rc {rc}, {len(records)} records, calls checked "
              f"{sum(r['integrity']['count_calls'] for r in records)}, payload-checked "
              f"{sum(r['integrity']['payload_calls'] for r in records)}, violations {caught or 'none'}")
    with open(os.path.join(out, "integrity_train.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        i = argv.index("--")
        return worker(argv[1], argv[2], argv[i + 1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("micro", "train"))
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--recipe", default="tiny-gpu:1gpu")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--fault", default="2:9", help="LAYER:ITERATION of the bit flip in the corrupted run")
    p.add_argument("--timeout", type=int, default=150, help="seconds per training run")
    o = p.parse_args(argv)
    os.makedirs(o.out, exist_ok=True)
    if o.what == "micro":
        micro(o.out, o.repeats, o.calls)
    else:
        train(o.out, o.recipe, o.iters, o.interval, o.fault, o.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
