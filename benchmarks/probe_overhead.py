"""The probe's overhead inside one real Megatron training run, two ways (GPU).

Run under torchrun with the launcher's Megatron arguments (include --moe-probe):

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/probe_overhead.py \
        --warmup 60 --window 20 --out results/overhead.json -- <megatron args> --moe-probe

(a) Cost accounting: in "accounted" windows, CUDA events around the probe's own
    kernels (the hot-path sum + add of every router call) and the host clock around
    every hook call give the probe's GPU time and host time per iteration, as a
    fraction of the iteration. Those windows also run the probe under
    torch.cuda.set_sync_debug_mode("error"), so a host sync inside the probe fails.
    In "timing" windows the host clock is also read around the dispatcher timer's own
    work (its wrapper minus the wrapped dispatch/combine call, and its backward tensor
    hooks): dispatcher timing launches no kernels, so its cost is host time.
(b) In-process A/B: after the warm-up, windows rotate off / stats / stats+timing /
    accounted; each iteration is timed with a synchronize on both sides (the same
    for every mode). Medians of the per-window medians, with a bootstrap 95% CI of
    the ratio to "off", are printed side by side.
Also checks the probe's counts against the alltoall dispatcher's own input_splits
at every flush (--verify, default on).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist

MODES = ("off", "stats", "timing", "accounted")
VERIFIED_MODES = ("warmup", "accounted")


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--out", required=True)
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--recipe", default=None, help="render this recipe's Megatron args (without probe flags) first")
    i = argv.index("--") if "--" in argv else len(argv)
    opts, extra = p.parse_args(argv[:i]), argv[i + 1:]
    if opts.recipe:
        from megatron_moe_probe import recipes

        r = recipes.load_recipe(opts.recipe)
        extra = recipes.render(r) + extra
    if not extra:
        p.error("give --recipe and/or Megatron arguments after --")
    return opts, extra


class Bench:
    def __init__(self, opts):
        self.opts = opts
        self.session = None
        self.step_ms = defaultdict(list)  # mode -> [(window, ms)]
        self.host_s = 0.0
        self.hook_calls = 0
        self.profile = None  # key figures from torch.profiler over one accounted window
        self.timing_profile = None  # CUDA runtime calls over one timing window
        self._seen = defaultdict(int)  # iterations seen per profiled mode
        self._prof = None
        self._prof_window = None
        self.accounted_iters = 0
        self.timing_host_s = 0.0  # the dispatcher timer's own host time, "timing" windows
        self.timing_calls = 0
        self.timing_iters = 0
        self._event_pool = None  # the timer's events, kept from one timing window to the next
        self.split_sums = defaultdict(lambda: None)  # slot -> summed input_splits since last flush
        self.verify_errors = []
        self.verified_flushes = 0
        self.mode = "warmup"

    def mode_for(self, iteration: int) -> str:
        if iteration < self.opts.warmup:
            return "warmup"
        return MODES[((iteration - self.opts.warmup) // self.opts.window) % len(MODES)]

    # -- session setup ------------------------------------------------------------------------
    def on_session(self, session):
        self.session = session
        session.interval = self.opts.window  # one flush per window: its cost lands in that window
        self._instrument()
        if not self.opts.no_verify:
            for b in session.bindings:
                if type(b.dispatcher).__name__ == "MoEAlltoAllTokenDispatcher":
                    self._capture_splits(b)

    def _instrument(self):
        """Accounted windows: host clock around each hook call, sync debug mode "error" around
        the probe's work, and a record_function range so the profiler attributes its kernels."""
        from megatron_moe_probe import colsum

        bench = self
        inner = colsum  # the hooks' device work: one call per router call
        for name in ("add_column_sums", "add_kept_and_dropped"):
            original = getattr(inner, name)

            def wrapped(*args, _orig=original, **kwargs):
                if bench.mode == "warmup":  # not timed: a host sync inside the probe raises
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        return _orig(*args, **kwargs)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                if bench._prof is not None:  # the profiled window: attribute the probe's kernels
                    with torch.profiler.record_function("moe_probe"):
                        return _orig(*args, **kwargs)
                return _orig(*args, **kwargs)

            setattr(inner, name, wrapped)

    @staticmethod
    def patch_hook_timing(bench):
        """Host time of whole hook calls (pre-hook + hook), accounted windows only."""
        from megatron_moe_probe.megatron.hooks import MegatronRouterHooks

        for factory in ("_make_pre_hook", "_make_hook", "_make_capacity_fallback"):
            original_factory = getattr(MegatronRouterHooks, factory)

            def make(self, binding, _f=original_factory):
                hook = _f(self, binding)

                def timed(*args):
                    if bench.mode != "accounted" or bench._prof is not None:
                        return hook(*args)
                    t0 = time.perf_counter()
                    out = hook(*args)
                    bench.host_s += time.perf_counter() - t0
                    bench.hook_calls += 1
                    return out

                return timed

            setattr(MegatronRouterHooks, factory, make)

    def _capture_splits(self, binding):
        d = binding.dispatcher
        original = d.token_dispatch
        bench = self

        def token_dispatch(*args, **kwargs):
            out = original(*args, **kwargs)
            if bench.mode in VERIFIED_MODES and binding.router.training:
                # At EP=1 the dispatcher sends nothing and keeps no splits: all its tokens stay here.
                raw = d.input_splits if d.input_splits is not None else [int(d.num_out_tokens)]
                splits = torch.as_tensor(raw).to("cpu", torch.long)  # already on host
                prev = bench.split_sums[binding.slot]
                bench.split_sums[binding.slot] = splits if prev is None else prev + splits
            return out

        d.__dict__["token_dispatch"] = token_dispatch

    def on_report(self, session, report):
        # Verify only in windows that are not part of the A/B (the gather costs time).
        if self.opts.no_verify or self.mode not in VERIFIED_MODES:
            self.split_sums.clear()
            return
        ep, ep_rank = session.layout.ep_size, session.layout.ep_rank
        rows = {}
        for slot, splits in self.split_sums.items():
            rows[slot] = splits.tolist()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (ep_rank, rows))
        for i, layer in enumerate(report.layers):
            expected = [[0] * ep for _ in range(ep)]
            for src, r in gathered:
                for j, v in enumerate(r.get(layer - 1, [0] * ep)):
                    expected[src][j] += v
            if expected != report.rank_matrix[i]:
                self.verify_errors.append({"step": report.step, "layer": layer,
                                           "probe": report.rank_matrix[i], "dispatcher": expected})
        self.verified_flushes += 1
        self.split_sums.clear()

    @staticmethod
    def patch_timer_accounting(bench):
        """Host time of the dispatcher timer itself: around each wrapper it installs, minus the
        dispatcher call it wraps; plus its backward tensor hooks. "timing" windows only."""
        from megatron_moe_probe.megatron.timing import DispatcherTimer

        original_wrap = DispatcherTimer._wrap

        def _wrap(self, binding, method, phase):
            dispatcher = binding.dispatcher
            before = dispatcher.__dict__.get(method)
            wrapped = getattr(dispatcher, method)
            inner_s = [0.0]

            def measured_inner(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return wrapped(*args, **kwargs)
                finally:
                    inner_s[0] += time.perf_counter() - t0

            dispatcher.__dict__[method] = measured_inner
            original_wrap(self, binding, method, phase)
            timed = dispatcher.__dict__[method]
            self._restore[-1] = (dispatcher, method, before)  # removal leaves no measuring shim behind

            def measured_outer(*args, **kwargs):
                if bench.mode != "timing" or bench._prof is not None:  # the profiler would inflate it
                    return timed(*args, **kwargs)
                inner_s[0] = 0.0
                t0 = time.perf_counter()
                out = timed(*args, **kwargs)
                bench.timing_host_s += time.perf_counter() - t0 - inner_s[0]
                bench.timing_calls += 1
                return out

            dispatcher.__dict__[method] = measured_outer

        DispatcherTimer._wrap = _wrap
        original_register = torch.Tensor.register_hook

        def register_hook(tensor, hook):
            if getattr(hook, "__qualname__", "").startswith("DispatcherTimer._time_backward"):
                inner_hook = hook

                def hook(grad):
                    t0 = time.perf_counter()
                    out = inner_hook(grad)
                    if bench.mode == "timing" and bench._prof is None:
                        bench.timing_host_s += time.perf_counter() - t0
                    return out

            return original_register(tensor, hook)

        torch.Tensor.register_hook = register_hook

    # -- the timed step -----------------------------------------------------------------------
    def wrap_train_step(self, mt):
        inner = mt.train_step
        bench = self

        def train_step(*args, **kwargs):
            iteration = kwargs.get("iteration", 0)
            mode = bench.mode_for(iteration)
            bench._set_mode(mode)
            window = (iteration - bench.opts.warmup) // bench.opts.window
            bench._profiler(mode, window)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1000
            if mode != "warmup":
                bench.step_ms[mode].append((window, ms))
                if mode == "accounted" and bench._prof is None:
                    bench.accounted_iters += 1  # host time is taken outside the profiled window
                bench.timing_iters += mode == "timing" and bench._prof is None
            return out

        mt.train_step = train_step

    def _profiler(self, mode, window):
        """Profile the second accounted window and the second timing window (the first after
        warm-up may still settle)."""
        if self._prof is not None and window != self._prof_window:
            self._prof.stop()
            self._summarize_profile()
            self._prof = None
        done = {"accounted": self.profile, "timing": self.timing_profile}
        if mode in done and done[mode] is None and self._prof is None:
            self._seen[mode] += 1
            if self._seen[mode] > self.opts.window:  # the mode's second window
                self._prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self._prof.start()
                self._prof_window, self._prof_mode, self._prof_iters = window, mode, 0
        if self._prof is not None:
            self._prof_iters += 1

    def _summarize_profile(self):
        events = self._prof.key_averages()
        iters = max(self._prof_iters, 1)
        # CUDA runtime calls as the host saw them: a call that waits for room in a full
        # launch queue shows here as a long one.
        runtime = {e.key: {"calls_per_iter": e.count / iters, "mean_us": e.cpu_time_total / max(e.count, 1)}
                   for e in events if e.key.startswith(("cudaEventRecord", "cudaLaunchKernel"))}
        if self._prof_mode == "timing":
            self.timing_profile = {"iterations": iters, "cuda_runtime": runtime}
            return
        total_gpu_us = sum(e.self_device_time_total for e in events)
        probe = [e for e in events if e.key == "moe_probe"]
        probe_gpu_us = probe[0].device_time_total if probe else 0.0
        probe_cpu_us = probe[0].cpu_time_total if probe else 0.0
        self.profile = {
            "iterations": iters,
            "all_kernels_ms_per_iter": total_gpu_us / 1000 / iters,
            "probe_kernels_ms_per_iter": probe_gpu_us / 1000 / iters,
            "probe_share_of_gpu_time": probe_gpu_us / total_gpu_us if total_gpu_us else None,
            "probe_calls": probe[0].count if probe else 0,
            "probe_cpu_ms_per_iter": probe_cpu_us / 1000 / iters,
            "cuda_runtime": runtime,
            "top_probe_kernels": [
                (e.key, e.self_device_time_total / max(e.count, 1)) for e in sorted(
                    events, key=lambda e: -e.self_device_time_total)[:8]],
        }

    def _set_mode(self, mode):
        if mode == self.mode or self.session is None:
            self.mode = mode
            return
        s = self.session
        if mode != "timing" and s.timers:
            # Keep the timer's event pool for the next timing window: in training the timer lives
            # for the whole run and reuses its events after the first interval, so creating fresh
            # CUDA events every window would charge the timer a cost training does not pay.
            self._event_pool = s.timers[0].pool
            s.remove_timers()
        if mode == "off":
            s.hooks.pause()
            s.paused = True
        else:
            s.hooks.resume()
            s.paused = False
            if mode == "timing" and not s.timers:
                s.add_timer(s.hooks.make_timer(s.gate, every=s.settings.timing_every,
                                               backward=s.settings.timing == "all"))
                if self._event_pool is not None:
                    self._event_pool.reset()
                    s.timers[0].pool = self._event_pool
        self.mode = mode

    # -- results ------------------------------------------------------------------------------
    def results(self):
        per_window = {}
        for mode, samples in self.step_ms.items():
            windows = defaultdict(list)
            for w, ms in samples:
                windows[w].append(ms)
            per_window[mode] = [statistics.median(v[2:] if len(v) > 4 else v) for v in windows.values()]
        out = {"windows": {m: len(v) for m, v in per_window.items()},
               "median_ms": {m: statistics.median(v) for m, v in per_window.items() if v}}
        rng = random.Random(0)
        base = per_window.get("off", [])
        for mode in ("stats", "timing", "accounted"):
            cur = per_window.get(mode, [])
            if not base or not cur:
                continue
            ratio = statistics.median(cur) / statistics.median(base)
            boot = sorted(statistics.median(rng.choices(cur, k=len(cur))) /
                          statistics.median(rng.choices(base, k=len(base))) for _ in range(2000))
            out[f"{mode}_over_off"] = {"ratio": ratio, "ci95": [boot[50], boot[1949]]}
        iters = max(self.accounted_iters, 1)
        step = out["median_ms"].get("off")
        host_ms = self.host_s * 1000 / iters
        out["accounting"] = {
            "hook_calls_per_iter": self.hook_calls / iters,
            "probe_host_ms_per_iter": host_ms,
            "host_fraction_of_off_step": host_ms / step if step else None,
            "timing_host_ms_per_iter": self.timing_host_s * 1000 / max(self.timing_iters, 1),
            "timing_host_fraction_of_off_step": (self.timing_host_s * 1000 / max(self.timing_iters, 1) / step
                                                 if step else None),
            "timing_wrapped_calls_per_iter": self.timing_calls / max(self.timing_iters, 1),
            "timing_profile": self.timing_profile,
            "profile": self.profile,
        }
        out["verify"] = {"flushes": self.verified_flushes, "mismatches": self.verify_errors[:5],
                         "n_mismatches": len(self.verify_errors)}
        if self.session is not None:  # a hook error disables the probe (and is logged): the run would not count
            out["probe_failed"] = bool(self.session.accumulator.failed)
        return out


def main(argv=None):
    opts, megatron_argv = parse(sys.argv[1:] if argv is None else argv)
    from megatron.training import training as mt

    from megatron_moe_probe import session as probe_session
    from megatron_moe_probe.megatron import launch, training

    training.install()  # first, so that our timer wraps the probe's train_step wrapper
    bench = Bench(opts)
    probe_session.session_callbacks.append(bench.on_session)
    probe_session.report_callbacks.append(bench.on_report)
    bench.wrap_train_step(mt)
    Bench.patch_hook_timing(bench)
    Bench.patch_timer_accounting(bench)
    _patch_session_pause()
    code = launch.main(megatron_argv)
    res = bench.results()
    rank = dist.get_rank() if dist.is_initialized() else 0
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)) or ".", exist_ok=True)
    path = opts.out.replace(".json", f".rank{rank}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    if rank == 0:
        print(json.dumps(res, indent=1))
    return code


def _patch_session_pause():
    """ProbeSession.after_step honours `paused` (benchmark-only: off windows skip the probe entirely)."""
    from megatron_moe_probe.session import ProbeSession

    original = ProbeSession.after_step

    def after_step(self, iteration, *args, **kwargs):
        if getattr(self, "paused", False):
            self.gate.close_step()  # the iteration is over: count nothing until the next one
            return None
        return original(self, iteration, *args, **kwargs)

    ProbeSession.after_step = after_step


if __name__ == "__main__":
    sys.exit(main() or 0)
