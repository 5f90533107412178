"""The live path's cost on one GPU, in one process, at the Qwen3-30B-A3B layer shape.

    python benchmarks/live_overhead.py --out DIR [--layers 2] [--seq 4096] [--rounds 6] [--window 6]

Megatron-Core's GPTModel with MoE layers shaped like Qwen3-30B-A3B's (hidden 2048, 128 experts,
top-8, expert FFN 768, 32 heads), local transformer implementation (no Transformer Engine),
bf16, EP=1 with the alltoall dispatcher, one micro-batch of `--seq` tokens per iteration.

1. `hook`: host time per router call, the hook of commit c195b06 (the body before issue 21,
   copied below as `OldHook`) against the session's hook now, on the same router:
   - the hook body called on its own with a fixed router output, and the whole router call
     with the hook registered minus the router call without any hook (what the module's
     hook path adds too); median and p90 per call over blocks of calls, at `--seq` tokens
     and at 128 tokens (host-bound: the GPU is idle and launches never wait);
   - kernel launches per call and the CUDA runtime's own host time per call (torch.profiler),
     so Python time = host time - launch time;
   - the new hook with the Triton kernel launched through kernel[grid](...) instead of directly;
   - one cProfile stack profile of each hook body (text, top entries);
   - the Triton kernel against the ATen sums on the router's real maps (exactness).
2. `train`: interleaved windows on one model, each iteration timed with a synchronize on both
   sides: off / stats (the probe with its defaults: statistics, the dispatch integrity check at
   `warn` and router health) / stats-bare (the router hook alone, the integrity check and router
   health off) / timing (stats + dispatcher timing, one
   iteration in 8, forward only: the defaults) / timing-every-1 (every iteration timed: the
   unsampled cost) / tracer (Megatron's RouterTracer, hooks registered for the window, one
   advance_step per iteration) / tpe (Megatron's tokens-per-expert logging at interval 1: its
   enable / save / disable calls around every iteration, as train_step makes them). Recorders
   are toggled between windows (hooks removed when off); the window order is shuffled each
   round. The probe's interval is the window, so each probe window holds one flush and, with
   timing, its sampled iteration(s): the MEAN of each window's iterations keeps both in. Then
   each mode's median over windows, and its ratio to off with a bootstrap 95 % CI.
   The tpe window uses Megatron's own hook function (ActivationLogger._make_tpe_hook) and
   save_tpe; Megatron attaches the hook to Transformer Engine's GroupedLinear `linear_fc1`, which
   TEGroupedMLP calls with tokens_per_expert.tolist(); on this local path it sits on the experts
   module and is handed the same list (as tests/dump_jobs.py does on CPU).

Writes DIR/live_overhead.json and DIR/hook_profile.txt and prints a summary.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import sys
import tempfile
import threading
import time

import torch

MODES = ("off", "stats", "stats-bare", "timing", "timing-every-1", "tracer", "tpe")
PROBE_MODES = ("stats", "stats-bare", "timing", "timing-every-1")


# ---- the model ---------------------------------------------------------------------------------

def build(layers: int, seq: int):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.transformer_config import TransformerConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel()
    torch.manual_seed(0)
    mc_random.model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=layers, hidden_size=2048, num_attention_heads=32, num_query_groups=4, kv_channels=128,
        ffn_hidden_size=6144, num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, add_bias_linear=False,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False, hidden_dropout=0.0,
        attention_dropout=0.0, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
    )
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=8192, max_sequence_length=seq,
                     position_embedding_type="rope").cuda()
    return model.bfloat16()  # every parameter bf16, router included, as Megatron's Float16Module makes them


class Batches:
    def __init__(self, seq: int):
        self.seq = seq
        self.g = torch.Generator(device="cuda").manual_seed(1)
        self.position_ids = torch.arange(seq, device="cuda").unsqueeze(0)
        self.mask = torch.triu(torch.ones(seq, seq, device="cuda"), diagonal=1).bool()[None, None]

    def step(self, model, optimizer):
        tokens = torch.randint(0, 8192, (1, self.seq + 1), device="cuda", generator=self.g)
        loss = model(tokens[:, :-1], self.position_ids, self.mask, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# ---- 1. the hook -------------------------------------------------------------------------------

class OldHook:
    """The router hook body of commit c195b06 (megatron/hooks.py MegatronProbe._make_hook,
    _should_count and probe.py RoutingProbe.record_routing), dropless path, for the before side."""

    def __init__(self, slots: int, experts: int):
        self.enabled, self.in_step = True, True
        self.current = torch.zeros(slots, experts, dtype=torch.long, device="cuda")
        self.rows = list(self.current.unbind(0))
        self.ctx = threading.local()
        self.ctx.counted = False
        self.ctx.binding = None
        self.current_domain = None
        try:
            from megatron.core.transformer.cuda_graphs import is_graph_warmup as warmup
        except Exception:
            warmup = lambda: False  # noqa: E731
        self._graph_warmup = warmup
        self._cuda = None

    def _stream_capturing(self):
        if self._cuda is None:
            self._cuda = torch.cuda.is_available()
        return self._cuda and torch.cuda.is_current_stream_capturing()

    def should_count(self, router):
        if not (self.enabled and router.training) or torch._C._current_graph_task_id() != -1:
            return False
        if self._stream_capturing():
            return True
        return self.in_step and not self._graph_warmup()

    def make(self, slot):
        def hook(module, args, output):
            try:
                counted = self.ctx.counted
                self.ctx.binding, self.ctx.counted = None, False
                if counted or not self.should_count(module):
                    return
                _, routing_map = output
                self.rows[slot].add_(routing_map.sum(0))
                if self.current_domain is None:
                    return
            except Exception as exc:  # pragma: no cover
                print("old hook failed", exc)

        return hook


def _per_call_us(fn, calls: int, blocks: int) -> dict:
    """Host time per call: `blocks` blocks of `calls` calls, a synchronize between blocks only."""
    per_call = []
    for _ in range(blocks):
        torch.cuda.synchronize()
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            per_call.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    per_call.sort()
    return {"median_us": statistics.median(per_call), "p90_us": per_call[int(0.9 * len(per_call))],
            "calls": len(per_call)}


def _launches(fn, calls: int) -> dict:
    """Kernel launches and CUDA runtime host time per call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    launch_names = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
    runtime = [e for e in prof.key_averages() if e.key.startswith(("cuda", "cu")) and e.key != "cudaDeviceSynchronize"]
    launches = sum(e.count for e in runtime if e.key.startswith(launch_names))
    memsets = sum(e.count for e in runtime if "Memset" in e.key)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    gpu_ops = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return {"launches_per_call": launches / calls, "memsets_per_call": memsets / calls,
            "gpu_ops_per_call": gpu_ops / calls,
            "runtime_host_us_per_call": sum(e.cpu_time_total for e in runtime if e.key.startswith(launch_names)
                                            or "Memset" in e.key) / calls,
            "kernels": sorted({e.key[:60] for e in kernels})}


def _stack_profile(fn, calls: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
    return s.getvalue()


def hook_part(model, session, tokens_list, calls, blocks) -> tuple[dict, str]:
    from megatron_moe_probe import colsum

    router = session.bindings[0].router
    slot = session.bindings[0].slot
    layout = session.layout
    old = OldHook(layout.num_layer_slots, layout.num_experts)
    new_body = session.hooks._make_hook(session.bindings[0])
    old_body = old.make(slot)
    out, profiles = {"triton": session.accumulator.use_triton, "direct_launch": bool(colsum._compiled)}, []
    session.hooks.pause()  # the session's registered hooks off: each variant registers its own
    session.start_step()  # the gate is open, as inside a training iteration
    for tokens in tokens_list:
        x = torch.randn(tokens, 1, 2048, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            output = router(x)
        rmap = output[1]
        # Exactness on the router's real map: the Triton kernel (if on) against ATen's sum.
        check = torch.zeros(layout.num_experts, dtype=torch.long, device="cuda")
        colsum.add_column_sums(check, rmap, session.accumulator.use_triton)
        res = {"map_exact": bool(torch.equal(check, rmap.sum(0))), "tokens": tokens}
        res["body_old"] = _per_call_us(lambda: old_body(router, (x,), output), calls, blocks)
        res["body_new"] = _per_call_us(lambda: new_body(router, (x,), output), calls, blocks)
        colsum.direct_launch = False  # the same kernel through Triton's kernel[grid](...) launch
        res["body_new_jit_launch"] = _per_call_us(lambda: new_body(router, (x,), output), calls, blocks)
        colsum.direct_launch = True
        res["launches_old"] = _launches(lambda: old_body(router, (x,), output), 200)
        res["launches_new"] = _launches(lambda: new_body(router, (x,), output), 200)

        # The capacity path's device work: old (c195b06: and, two sums, a subtraction, two adds)
        # against the accumulator's one call now, on the same maps.
        after = rmap & (torch.rand(rmap.shape, device="cuda") < 0.8)
        acc = session.accumulator
        cur = torch.zeros(2, layout.num_experts, dtype=torch.long, device="cuda")

        def old_capacity():
            kept_map = rmap & after
            kept = kept_map.sum(0)
            cur[0].add_(kept)
            cur[1].add_(rmap.sum(0) - kept)

        if acc._current_dropped is None:  # dropless model: give the accumulator its capacity rows
            acc._current_dropped = torch.zeros_like(acc._current)
            acc._current_dropped_rows = list(acc._current_dropped.unbind(0))
        res["capacity_old"] = _per_call_us(old_capacity, calls, blocks)
        res["capacity_new"] = _per_call_us(lambda: acc.add_capacity_maps(slot, rmap, after), calls, blocks)
        res["capacity_launches_old"] = _launches(old_capacity, 200)
        res["capacity_launches_new"] = _launches(lambda: acc.add_capacity_maps(slot, rmap, after), 200)
        check2 = torch.zeros(2, layout.num_experts, dtype=torch.long, device="cuda")
        colsum.add_kept_and_dropped(check2[0], check2[1], rmap, after, acc.use_triton)
        res["capacity_exact"] = bool(torch.equal(check2[0], (rmap & after).sum(0))
                                     and torch.equal(check2[1], (rmap & ~after).sum(0)))

        def call():
            router(x)

        # The whole router call, interleaved block by block: no hook / the old hook / the session's
        # hook / the new body called from a wrapper of router.forward (no module hook at all).
        original_forward = router.forward

        def wrapped_forward(*a, **k):
            out_ = original_forward(*a, **k)
            new_body(router, a, out_)
            return out_

        def variant(name):
            if name == "old_hook":
                return [router.register_forward_hook(old_body)]
            if name == "new_hook":
                session.hooks.resume()
                return [session.hooks]
            if name == "new_forward_wrap":
                router.forward = wrapped_forward
                return ["wrap"]
            return []

        def undo(handles):
            for h in handles:
                if h == "wrap":
                    del router.forward
                elif h is session.hooks:
                    session.hooks.pause()
                else:
                    h.remove()

        names = ("no_hook", "old_hook", "new_hook", "new_forward_wrap")
        samples = {n: [] for n in names}
        for _ in range(blocks):
            for n in names:
                handles = variant(n)
                r = _per_call_us(call, calls // 2, 1)
                undo(handles)
                samples[n].append(r["median_us"])
        for n in names:
            res[f"router_{n}"] = {"median_of_block_medians_us": statistics.median(samples[n]), "blocks": samples[n]}
        for n in names[1:]:
            res[f"hook_path_{n}_us"] = statistics.median([a - b for a, b in zip(samples[n], samples["no_hook"])])
        out[f"tokens_{tokens}"] = res
        if tokens == tokens_list[0]:
            profiles.append(f"== cProfile, old hook body, {tokens} tokens, 3000 calls\n"
                            + _stack_profile(lambda: old_body(router, (x,), output), 3000))
            profiles.append(f"== cProfile, new hook body, {tokens} tokens, 3000 calls\n"
                            + _stack_profile(lambda: new_body(router, (x,), output), 3000))
    session.end_step_without_counting()
    session.accumulator.discard_current()
    session.accumulator._current_dropped = None  # back to the dropless model's accumulator
    session.accumulator._current_dropped_rows = []
    session.hooks.resume()
    return out, "\n".join(profiles)


# ---- 2. interleaved training windows -------------------------------------------------------------

class Recorders:
    """Switches the recorders of one mode on and off between windows."""

    def __init__(self, model, session, trace_dir: str, tpe_dir: str):
        self.model, self.session = model, session
        self.trace_dir, self.tpe_dir = trace_dir, tpe_dir
        self.tracer = None
        self.every_1 = None
        self.sampled = None
        self.integrity = {"windows": 0, "violations": 0, "count_calls": 0, "payload_calls": 0}

    def set(self, mode: str) -> None:
        s = self.session
        s.remove_timers()
        if self.tracer is not None:
            self.tracer.remove_hooks()
            self.tracer = None
        probe = mode in PROBE_MODES
        s.hooks.resume() if probe else s.hooks.pause()
        # The interval contributors (dispatch integrity, router health): on in every probe mode but
        # stats-bare, off (one attribute read per wrapped call) in the others.
        for c in s.contributors:
            c.enabled = probe and mode != "stats-bare"
        if mode in ("timing", "timing-every-1"):
            every = 1 if mode == "timing-every-1" else s.settings.timing_every
            s.add_timer(s.hooks.make_timer(s.gate, every=every, backward=s.settings.timing == "all"))
        if mode == "tracer":
            from megatron.core.transformer.moe.router_trace import RouterTracer

            self.tracer = RouterTracer(self.trace_dir, max_steps=10**9, rank=0, training_mode=True)
            self.tracer.register_hooks([self.model])

    def before(self, mode: str) -> None:
        if mode == "tpe":  # what --save-tokens-per-expert-interval 1 does before each forward/backward
            from megatron.core.transformer.moe.moe_layer import MoELayer
            from megatron.training.activation_logging import _get_logger

            logger = _get_logger(self.tpe_dir)
            self.tpe_handles = []
            for name, layer in self.model.named_modules():
                if not isinstance(layer, MoELayer):
                    continue
                hook = logger._make_tpe_hook("model_chunk0", f"{name}.experts.linear_fc1")

                def on_experts(module, args, kwargs, output, _hook=hook):
                    _hook(module, (args[0], torch.as_tensor(args[1]).tolist()), kwargs, output)

                self.tpe_handles.append(layer.experts.register_forward_hook(on_experts, with_kwargs=True))
        if mode in PROBE_MODES:
            self.session.start_step()

    def after(self, mode: str, iteration: int, window: int) -> None:
        if mode == "tpe":  # ... and after it: save_tpe(iteration + 1), the hooks removed
            from megatron.training.activation_logging import _get_logger

            _get_logger(self.tpe_dir).save_tpe(iteration)
            for h in self.tpe_handles:
                h.remove()
        if mode == "tracer":
            self.tracer.advance_step(iteration)
        if mode in PROBE_MODES:
            self.session.after_step(iteration)
            if iteration % window == 0 and self.session.last_report is not None:
                meta = self.session.last_report.meta
                self.sampled = meta.get("timing_sampled_iterations") or self.sampled
                block = (meta.get("extras") or {}).get("integrity")
                if block and mode != "stats-bare":  # every probe window's verdict (must be clean)
                    self.integrity["windows"] += 1
                    self.integrity["violations"] += block["violation_count"]
                    self.integrity["count_calls"] += block["count_calls"]
                    self.integrity["payload_calls"] += block["payload_calls"]


def train_part(model, session, seq: int, rounds: int, window: int, warmup: int) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, foreach=True)
    batches = Batches(seq)
    tmp = tempfile.mkdtemp(prefix="live_overhead_")
    rec = Recorders(model, session, os.path.join(tmp, "trace"), tmp)
    session.interval = window  # one flush per probe window: its cost lands in the window
    # Warm-up (allocator, autotuning, the first flush) with the probe on.
    rec.set("timing")
    for i in range(1, warmup + 1):
        rec.before("timing")
        batches.step(model, optimizer)
        rec.after("timing", i, window)
    per_round: list[dict[str, list[float]]] = []  # round -> mode -> its window's iteration times (ms)
    rng = random.Random(0)
    iteration = warmup - warmup % window + window  # windows start on a multiple of `window`
    reports_before = session.reports_written
    failed = {}
    for r in range(rounds):
        order = [m for m in MODES if m not in failed]
        rng.shuffle(order)
        this_round: dict[str, list[float]] = {}
        for mode in order:
            times = []
            try:
                rec.set(mode)
                for _ in range(window):
                    iteration += 1
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    rec.before(mode)
                    batches.step(model, optimizer)
                    rec.after(mode, iteration, window)
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) * 1000)
            except Exception as exc:  # a recorder that fails here is reported, the others go on
                failed[mode] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                iteration += window - len(times)
                optimizer.zero_grad(set_to_none=True)
                continue
            this_round[mode] = times
        per_round.append(this_round)
    rec.set("off")
    means = {m: [statistics.fmean(rd[m]) for rd in per_round if m in rd] for m in MODES}
    means = {m: v for m, v in means.items() if v}
    out = {"failed_modes": failed, "windows_per_mode": {m: len(v) for m, v in means.items()}, "window": window,
           "median_ms": {m: statistics.median(v) for m, v in means.items()},
           "window_means_ms": means, "iteration_ms": per_round, "probe_reports": session.reports_written - reports_before,
           "timing_sampled_iterations_last": rec.sampled,
           "integrity": rec.integrity, "probe_failed": session.accumulator.failed}
    # Paired by round: each mode's window against the off window of the same round, so drift between
    # rounds (clocks, other tenants) cancels. "mean": the window's mean, with its one flush and its
    # sampled timed iteration (the probe's interval is the window: the flush weighs interval/window
    # times more than in a run at that interval); "median": the window's median iteration, the
    # steady state between flushes.
    boot = random.Random(1)
    for mode in MODES[1:]:
        for stat, f in (("mean", statistics.fmean), ("median", statistics.median)):
            ratios = [f(rd[mode]) / f(rd["off"]) for rd in per_round if mode in rd and "off" in rd]
            if not ratios:
                continue
            draws = sorted(statistics.median(boot.choices(ratios, k=len(ratios))) for _ in range(4000))
            out.setdefault(f"{mode}_over_off", {})[stat] = {"ratio": statistics.median(ratios),
                                                             "ci95": [draws[100], draws[3899]], "rounds": len(ratios)}
    # The flush itself: a probe window's flush iteration against its own median iteration.
    flush = [rd[m][-1] - statistics.median(rd[m][:-1]) for rd in per_round for m in PROBE_MODES if m in rd]
    if flush:
        out["flush_extra_ms"] = {"median": statistics.median(flush), "n": len(flush)}
    return out


def _dump(folder: str, result: dict) -> None:
    with open(os.path.join(folder, "live_overhead.json"), "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--blocks", type=int, default=9)
    p.add_argument("--parts", default="hook,train")
    opts = p.parse_args(argv)
    os.makedirs(opts.out, exist_ok=True)
    from megatron_moe_probe.session import open_session
    from megatron_moe_probe.settings import ProbeSettings

    model = build(opts.layers, opts.seq)
    settings = ProbeSettings.create(opts.window, writers=["local"], out_dir=os.path.join(opts.out, "run"), timing=True)
    session = open_session([model], settings)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": opts.layers,
              "seq": opts.seq, "shape": "Qwen3-30B-A3B layer: hidden 2048, 128 experts, top-8, expert FFN 768",
              "impl": "local (no Transformer Engine), bf16, EP=1, alltoall"}
    parts = opts.parts.split(",")
    if "hook" in parts:
        try:
            result["hook"], profile = hook_part(model, session, [opts.seq, 128], opts.calls, opts.blocks)
            with open(os.path.join(opts.out, "hook_profile.txt"), "w") as f:
                f.write(profile)
        except Exception:
            import traceback

            result["hook_error"] = traceback.format_exc()
            print(result["hook_error"], file=sys.stderr)
        _dump(opts.out, result)
    if "train" in parts:
        result["train"] = train_part(model, session, opts.seq, opts.rounds, opts.window, opts.warmup)
    _dump(opts.out, result)
    print(json.dumps(result, indent=1))
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
