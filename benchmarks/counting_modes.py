"""Does the probe count every trained token exactly once on the production path? (GPU)

For each mode (local vs Transformer Engine, each CUDA-graph setting Megatron 0.19
accepts for MoE training), train N iterations with the probe on through the real
`moe-probe train` worker (Megatron's pretrain -> train -> train_step) and compare,
per record and per layer, the probe's assignments against two independent numbers:

- the formula: record steps x global batch x sequence x top-k (dropless);
- the dispatcher's own counts: the `tokens_per_expert` every MoE layer's token
  dispatcher hands to its experts, summed on the device by a hook on the experts
  (outside every CUDA-graph scope that keeps the experts eager; "n/a" where the
  experts themselves are inside a graph).

    python benchmarks/counting_modes.py --out DIR [--iters 30] [--interval 10] [--modes local,te,...]

prints a mode -> OK / mismatch / failed table and writes DIR/counting_modes.{json,md}.
A mode Megatron itself rejects, or that fails inside Megatron, is reported with
its error line, not as a probe result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TE = ["--transformer-impl", "transformer_engine", "--moe-grouped-gemm", "--moe-permute-fusion",
      "--moe-router-fusion"]
MODES: dict[str, list[str]] = {
    "local": ["--transformer-impl", "local"],
    "te": TE,
    "te-graph-router": TE + ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-modules", "moe_router"],
    "te-graph-router-preprocess": TE + ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-modules",
                                        "moe_router", "moe_preprocess"],
    "te-graph-attn-router-preprocess": TE + ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-modules",
                                             "attn", "moe_router", "moe_preprocess"],
    "local-graph": ["--transformer-impl", "local", "--cuda-graph-impl", "local"],
    # Megatron graphs a whole MoE layer only with drop-and-pad: its dropless path syncs with the host.
    "local-graph-capacity": ["--transformer-impl", "local", "--cuda-graph-impl", "local",
                             "--moe-expert-capacity-factor", "1.0", "--moe-pad-expert-input-to-capacity"],
    "full-iteration": ["--transformer-impl", "local", "--cuda-graph-impl", "full_iteration",
                       "--no-check-for-nan-in-loss-and-grad"],
    "full-iteration-capacity": ["--transformer-impl", "local", "--cuda-graph-impl", "full_iteration",
                                "--no-check-for-nan-in-loss-and-grad", "--moe-expert-capacity-factor", "1.0",
                                "--moe-pad-expert-input-to-capacity"],
}


# ---- worker: one training run with the dispatcher-side truth ------------------------------------

class Truth:
    """Per MoE layer, the tokens_per_expert its dispatcher handed to the experts, summed on the device
    between flushes; compared with each report the probe writes."""

    def __init__(self):
        self.sums = {}
        self.records = []
        self.eager_expert_calls = 0

    def on_session(self, session):
        import torch

        for binding in session.bindings:
            layer = next(m for m in session.hooks.moe_layers if m.router is binding.router)
            slot = binding.slot
            self.sums[slot] = torch.zeros(session.layout.num_experts // session.layout.ep_size,
                                          dtype=torch.long, device="cuda")

            def hook(module, args, output, _slot=slot):
                if not module.training or torch.cuda.is_current_stream_capturing():
                    return
                tokens_per_expert = args[1]
                self.sums[_slot].add_(torch.as_tensor(tokens_per_expert).to("cuda", torch.long))
                self.eager_expert_calls += 1

            layer.experts.register_forward_hook(hook)  # not a pre-hook: Megatron's local graphs refuse those

    def on_report(self, session, report):
        import torch
        import torch.distributed as dist

        rows = {}
        for slot, sums in self.sums.items():
            local = sums.clone()
            group = session.hooks.moe_layers[0].token_dispatcher.ep_group
            if dist.is_initialized() and dist.get_world_size(group) > 1:
                parts = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, local, group=group)
                local = torch.cat(parts)
            rows[slot + 1] = local.tolist()
            sums.zero_()
        self.records.append({
            "step": report.step, "steps": report.steps, "layers": report.layers,
            "probe": report.tokens_per_expert, "dispatcher": [rows.get(layer) for layer in report.layers],
            "dropped": report.dropped_per_expert,
            "skipped_iterations": report.meta.get("skipped_iterations"), "reruns": report.meta.get("reruns"),
            "eager_expert_calls": self.eager_expert_calls,
            "integrity": (report.meta.get("extras") or {}).get("integrity"),
        })
        self.eager_expert_calls = 0


def worker(out: str, megatron_argv: list[str]) -> int:
    from megatron_moe_probe import session as probe_session
    from megatron_moe_probe.megatron import launch

    truth = Truth()
    probe_session.session_callbacks.append(truth.on_session)
    probe_session.report_callbacks.append(truth.on_report)
    code = launch.main(megatron_argv)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(truth.records, f)
    return code


# ---- driver ---------------------------------------------------------------------------------------

def megatron_args(recipe: str, mode_args: list[str], iters: int, interval: int, run_dir: str,
                  eval_interval: int = 0) -> list[str]:
    from megatron_moe_probe import recipes

    base = recipes.render(recipes.load_recipe(recipe), include_probe=False)
    # The recipe's own --transformer-impl is replaced by the mode's.
    cleaned, skip = [], False
    for a in base:
        if skip:
            skip = False
            continue
        if a == "--transformer-impl":
            skip = True
            continue
        cleaned.append(a)
    return cleaned + mode_args + [
        "--train-iters", str(iters), "--log-interval", str(interval), "--eval-interval", str(eval_interval or interval),
        "--eval-iters", "1", "--moe-probe", "--moe-probe-interval", str(interval), "--moe-probe-dir", run_dir,
        "--moe-probe-writers", "local"]


def check(records: list[dict], tokens_per_iteration: int) -> tuple[str, list[str]]:
    problems = []
    if not records:
        return "no records", ["the probe wrote no record"]
    dispatcher_seen = False
    for r in records:
        dropped = r.get("dropped") or [[0]] * len(r["layers"])
        for layer, probe, disp, drop in zip(r["layers"], r["probe"], r["dispatcher"], dropped):
            want = r["steps"] * tokens_per_iteration
            # With a capacity factor every routed token is either kept (counted) or dropped.
            if sum(probe) + sum(drop) != want:
                problems.append(f"step {r['step']} layer {layer}: probe {sum(probe)} + dropped {sum(drop)} "
                                f"!= formula {want}")
            if r.get("dropped"):
                continue  # padded to capacity: the dispatcher hands the experts padded counts
            if disp is not None and sum(disp) > 0:
                dispatcher_seen = True
                if list(disp) != list(probe):
                    problems.append(f"step {r['step']} layer {layer}: probe != dispatcher "
                                    f"({sum(probe)} vs {sum(disp)})")
    status = "OK" if not problems else "MISMATCH"
    if status == "OK" and not dispatcher_seen:
        status = "OK (formula; dispatcher n/a)"
    return status, problems


def integrity_summary(records: list[dict]) -> str:
    """The dispatch integrity check's verdicts over a mode's records (issue 23), in the line the
    demo and `analyze` print for a run (clean / unchecked and why / the first violation)."""
    from types import SimpleNamespace

    from megatron_moe_probe.integrity_report import run_summary

    summary = run_summary([SimpleNamespace(meta={"extras": {"integrity": r.get("integrity")}}, step=r["step"],
                                           steps=r["steps"]) for r in records])
    return summary["line"] if summary else "dispatch integrity: no block (check off)"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        i = argv.index("--")
        return worker(argv[1], argv[i + 1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", default="tiny-gpu:1gpu")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--timeout", type=int, default=240, help="seconds per mode")
    p.add_argument("--eval-interval", type=int, default=0, help="Megatron's --eval-interval (default: --interval)")
    opts = p.parse_args(argv)
    modes = [m for m in opts.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    os.makedirs(opts.out, exist_ok=True)
    from megatron_moe_probe import recipes

    r = recipes.load_recipe(opts.recipe)
    t = r.training
    tokens_per_iteration = t.global_batch_size * t.seq_length * r.model.moe.router_topk
    nproc = r.parallelism.gpus_per_node * r.parallelism.nodes
    rows = []
    for mode in modes:
        run_dir = os.path.join(opts.out, f"run_{mode}")
        truth = os.path.join(opts.out, f"truth_{mode}.json")
        log = os.path.join(opts.out, f"{mode}.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               os.path.abspath(__file__), "--worker", truth, "--",
               *megatron_args(opts.recipe, MODES[mode], opts.iters, opts.interval, run_dir, opts.eval_interval)]
        start = time.time()
        print(f"=== {mode}: {' '.join(MODES[mode])}", flush=True)
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=opts.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        seconds = round(time.time() - start, 1)
        if rc != 0 or not os.path.exists(truth):
            tail = [ln.strip() for ln in open(log, errors="replace") if "Error" in ln or "error" in ln][-2:]
            rows.append({"mode": mode, "status": f"failed in Megatron (exit {rc})", "seconds": seconds,
                         "detail": tail})
            print(f"    failed (exit {rc}): {tail}", flush=True)
            continue
        records = json.load(open(truth))
        status, problems = check(records, tokens_per_iteration)
        integrity = integrity_summary(records)
        rows.append({"mode": mode, "status": status, "integrity": integrity, "seconds": seconds, "records": len(records),
                     "steps": [rec["steps"] for rec in records], "detail": problems[:5],
                     "per_record_assignments": [sum(map(sum, rec["probe"])) for rec in records]})
        print(f"    {status}; {integrity}; records steps {[rec['steps'] for rec in records]}; {problems[:3]}",
              flush=True)
    json.dump({"recipe": opts.recipe, "iters": opts.iters, "interval": opts.interval,
               "tokens_per_iteration_per_layer": tokens_per_iteration, "modes": rows},
              open(os.path.join(opts.out, "counting_modes.json"), "w"), indent=1)
    lines = ["| mode | Megatron flags | result | dispatch integrity | records (steps) |", "|---|---|---|---|---|"]
    for row in rows:
        detail = "; ".join(row["detail"]) if row["detail"] else ""
        lines.append(f"| `{row['mode']}` | `{' '.join(MODES[row['mode']])}` | {row['status']}"
                     f"{' — ' + detail if detail else ''} | {row.get('integrity', '-')} | {row.get('steps', '-')} |")
    open(os.path.join(opts.out, "counting_modes.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["status"].startswith("OK") or r["status"].startswith("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
