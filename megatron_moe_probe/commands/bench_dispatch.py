"""`moe-probe bench-dispatch RUN`: Megatron's real token dispatchers driven standalone by the
run's recorded routing (per-iteration expert counts), beside balanced and worst-case routing.

Without torchrun it spawns `--ranks` gloo processes on CPU and checks correctness only
(combine(dispatch(x)) through identity experts == probs-weighted x; alltoall == allgather;
the counts each dispatcher hands its experts == the replayed counts); timings on CPU are not
reported. Under torchrun on GPUs (NCCL) it times dispatch and combine with CUDA events.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_moe_probe.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder, or a Megatron RouterTracer / tokens-per-expert dump folder")
    p.add_argument("--dispatchers", default="alltoall,allgather,flex-deepep,flex-hybridep",
                   help="comma-separated: alltoall, allgather, flex-deepep, flex-hybridep "
                        "(CPU runs only alltoall and allgather)")
    p.add_argument("--ranks", type=int, default=2, help="CPU only: gloo processes = EP degree (default 2)")
    p.add_argument("--layers", default=None, help="comma-separated global layer numbers (default all)")
    p.add_argument("--max-recorded", type=int, default=8, help="replay the last N (record, layer) dispatches (default 8)")
    p.add_argument("--hidden-size", type=int, help="override the run's hidden size")
    p.add_argument("--topk", type=int, help="override the run's top-k")
    p.add_argument("--tokens", type=int, help="tokens per rank per dispatch (default micro-batch x sequence / TP)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="GPU activations (CPU always fp32)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", dest="json_out", default=None, help="also write the result as JSON to this file")


def _ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} wants comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from megatron_moe_probe.analysis import routing_replay as rr

    under_torchrun = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun else args.ranks
    if world < 1 or args.max_recorded < 1 or args.iters < 1 or args.warmup < 0:
        raise UsageError("--ranks, --max-recorded and --iters must be positive, --warmup >= 0")
    names = [n.strip() for n in args.dispatchers.split(",") if n.strip()]
    from megatron_moe_probe.megatron import replay

    unknown = [n for n in names if n not in replay.DISPATCHERS]
    if unknown:
        raise UsageError(f"unknown dispatcher(s) {', '.join(unknown)}; choose from {', '.join(replay.DISPATCHERS)}")
    try:
        window = rr.load_source(args.run, _ints(args.layers, "--layers"))
    except UsageError:
        raise
    except Exception as exc:  # a malformed file the readers did not name
        raise UsageError(f"{args.run}: cannot read the run: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    geo = rr.geometry(window, ep=world, hidden_size=args.hidden_size, topk=args.topk, tokens_per_rank=args.tokens)
    scenarios = [s.to_dict() for s in rr.scenarios(window, geo, args.max_recorded)]
    cpu_only = not under_torchrun
    notes = []
    if cpu_only:
        skipped = [n for n in names if n not in replay.CPU_DISPATCHERS]
        if skipped:
            notes.append(f"environment limit: {', '.join(skipped)} need CUDA (flex has no CPU path); not run on CPU")
        names = [n for n in names if n in replay.CPU_DISPATCHERS]
    spec = replay.BenchSpec(num_experts=geo.num_experts, topk=geo.topk, hidden_size=geo.hidden_size,
                            tokens_per_rank=geo.tokens_per_rank, scenarios=scenarios, dispatchers=names,
                            dtype="fp32" if cpu_only else args.dtype, warmup=args.warmup, iters=args.iters)
    if under_torchrun:
        import torch

        if not torch.cuda.is_available():  # gloo on CPU: the CPU stand-ins, before any model part
            from megatron_moe_probe.cpu import compat

            compat.enable()
        per_rank = replay.torchrun_main(spec)
        if per_rank is None:
            return 0
    else:
        from megatron_moe_probe.cpu.bench_dispatch import run_cpu

        per_rank = run_cpu(spec, world)
    bpe = 2 if per_rank[0]["dtype"] in ("bfloat16", "float16") else 4
    result = rr.assemble(per_rank, scenarios, geo, bpe)
    result.update(geometry=geo.__dict__, scenarios=scenarios, notes=notes, run=str(args.run))
    _print(result, cpu_only)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    bad = [r for r in result["rows"] if "error" in r or not r.get("counts_match", False)
           or r.get("max_abs_error", 0) > (1e-4 if bpe == 4 else 5e-2)]
    mismatch = [v for v in result["alltoall_vs_allgather"] if v > (1e-4 if bpe == 4 else 5e-2)]
    if bad or mismatch:
        print(f"bench-dispatch: CHECK FAILED: {len(bad)} row(s) wrong, {len(mismatch)} alltoall/allgather mismatch(es)",
              file=sys.stderr)
        return 1
    return 0


def _print(res: dict, cpu_only: bool) -> None:
    g = res["geometry"]
    print(f"bench-dispatch {res['run']}: EP {res['ep']}, {g['num_experts']} experts, top-{g['topk']}, "
          f"hidden {g['hidden_size']}, {g['tokens_per_rank']} tokens/rank/dispatch, {res['dtype']} on {res['device']}")
    print("  geometry from: " + ", ".join(f"{k} {v}" for k, v in g["sources"].items()))
    for sc in res["scenarios"]:
        for note in sc["notes"]:
            print(f"  note: {sc['label']}: {note}")
    for note in res["notes"]:
        print(f"  {note}")
    for name, line in res["limits"].items():
        print(f"  environment limit: {name}: {line}")
    if cpu_only or not res["timed"]:
        print("  timings on CPU are not reported (gloo on CPU says nothing about NVLink/NCCL); correctness only")
    head = f"  {'scenario':<34} {'dispatcher':<14} {'counts':<7} {'max err':>9} {'recv MB':>8}"
    if res["timed"]:
        head += f" {'disp ms':>8} {'comb ms':>8} {'disp GB/s':>9} {'comb GB/s':>9}"
    print(head)
    for r in res["rows"]:
        label = f"{r['name']}: {r['label']}"[:34]
        if "error" in r:
            print(f"  {label:<34} {r['dispatcher']:<14} error: {r['error']}")
            continue
        line = (f"  {label:<34} {r['dispatcher']:<14} {'equal' if r['counts_match'] else 'DIFFER':<7} "
                f"{r['max_abs_error']:>9.2e} {r['bytes_received_max'] / 1e6:>8.2f}")
        if "ms" in r:
            line += (f" {r['ms']['dispatch_ms']:>8.3f} {r['ms']['combine_ms']:>8.3f} "
                     f"{(r['dispatch_gb_s'] or 0):>9.1f} {(r['combine_gb_s'] or 0):>9.1f}")
        print(line)
    if res["alltoall_vs_allgather"]:
        print(f"  alltoall vs allgather outputs: max |diff| {max(res['alltoall_vs_allgather']):.2e} per scenario worst")
    print("  recv MB: the busiest rank's hidden-state bytes received from other ranks in one dispatch "
          "(alltoall: per token-expert copy; flex: per token-rank; allgather: all other ranks' tokens)")
