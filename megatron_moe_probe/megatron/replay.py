"""Megatron's real token dispatchers, standalone, driven by replayed routing (`bench-dispatch`).

No model: each dispatcher (MoEAlltoAllTokenDispatcher, MoEAllGatherTokenDispatcher,
MoEFlexTokenDispatcher with a DeepEP / HybridEP backend) is built from a TransformerConfig and
called in MoELayer's order (megatron-core 0.19.2 moe_layer.py): dispatch_preprocess ->
token_dispatch -> dispatch_postprocess -> experts -> combine_preprocess -> token_combine ->
combine_postprocess. The experts are identity experts that apply the routing probabilities
(as Megatron's experts do with `permuted_probs`), so the output must equal x * sum of the
token's probabilities: the correctness check. On GPUs (NCCL) the dispatch and combine are
timed with CUDA events; on CPU (gloo) nothing is timed.

`bench_rank(rank, world, spec)` runs on every rank (under torchrun, or on CPU through
cpu/bench_dispatch.py, which installs the CPU stand-ins first) and returns plain data;
`commands/bench_dispatch.py` assembles and prints it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_moe_probe.analysis import routing_replay as rr

# name -> (moe_token_dispatcher_type, moe_flex_dispatcher_backend)
DISPATCHERS = {
    "alltoall": ("alltoall", None),
    "allgather": ("allgather", None),
    "flex-deepep": ("flex", "deepep"),
    "flex-hybridep": ("flex", "hybridep"),
}
CPU_DISPATCHERS = ("alltoall", "allgather")


@dataclass(frozen=True)
class BenchSpec:
    num_experts: int
    topk: int
    hidden_size: int
    tokens_per_rank: int
    scenarios: list[dict]          # Scenario.to_dict() each
    dispatchers: list[str]
    dtype: str = "bf16"            # bf16 or fp32 (CPU uses fp32)
    warmup: int = 3
    iters: int = 10
    seed: int = 0
    extra_config: dict = field(default_factory=dict)


def backend_limit(name: str) -> str | None:
    """None when the dispatcher's backend imports here, else the exact import error line."""
    backend = DISPATCHERS[name][1]
    if backend is None:
        return None
    stmt = "from deep_ep import Buffer" if backend == "deepep" else "from deep_ep import HybridEPBuffer"
    try:
        if backend == "deepep":
            from deep_ep import Buffer  # noqa: F401
            from deep_ep.utils import EventOverlap  # noqa: F401
        else:
            from deep_ep import HybridEPBuffer  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build raising anything else
        return f"{stmt}: {type(exc).__name__}: {exc}"
    return None


def _config(spec: BenchSpec, name: str, ep: int, on_gpu: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kind, backend = DISPATCHERS[name]
    kwargs = dict(
        num_layers=1, hidden_size=spec.hidden_size, num_attention_heads=1, ffn_hidden_size=spec.hidden_size,
        num_moe_experts=spec.num_experts, moe_router_topk=spec.topk, moe_ffn_hidden_size=spec.hidden_size,
        moe_token_dispatcher_type=kind, expert_model_parallel_size=ep, add_bias_linear=False,
        use_cpu_initialization=not on_gpu, params_dtype=torch.bfloat16 if spec.dtype == "bf16" else torch.float32,
        bf16=spec.dtype == "bf16", moe_router_load_balancing_type="none",
        gradient_accumulation_fusion=False,
    )
    if backend:
        kwargs.update(moe_flex_dispatcher_backend=backend)
    kwargs.update(spec.extra_config)
    return TransformerConfig(**kwargs)


def _dispatcher(spec: BenchSpec, name: str, on_gpu: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import token_dispatcher as td

    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    local = spec.num_experts // ep
    indices = list(range(ep_rank * local, (ep_rank + 1) * local))
    cls = {"alltoall": td.MoEAlltoAllTokenDispatcher, "allgather": td.MoEAllGatherTokenDispatcher,
           "flex": td.MoEFlexTokenDispatcher}[DISPATCHERS[name][0]]
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    return cls(local, indices, config=_config(spec, name, ep, on_gpu), pg_collection=pgs)


class _Timer:
    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.marks: list = []

    def mark(self):
        if self.on_gpu:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)

    def intervals_ms(self) -> list[float]:
        if not self.on_gpu:
            return []
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]


def _one_pass(d, x, rmap, probs, timer: _Timer):
    """MoELayer's sequence with identity experts; marks: start, dispatched (comm), dispatched
    (ready for experts), experts done, combined (comm), combined (output)."""
    timer.mark()
    h, p = d.dispatch_preprocess(x, rmap, probs)
    timer.mark()
    h, p = d.token_dispatch(h, p)
    timer.mark()
    h, tokens_per_expert, pp = d.dispatch_postprocess(h, p)
    timer.mark()
    y = (h.float() * pp.float().unsqueeze(-1)).to(h.dtype)  # identity experts apply the probs
    timer.mark()
    y = d.combine_preprocess(y)
    timer.mark()
    y = d.token_combine(y)
    timer.mark()
    out = d.combine_postprocess(y)
    timer.mark()
    return out, tokens_per_expert


# timer intervals: 0 pre, 1 a2a, 2 post, 3 experts, 4 combine pre, 5 combine a2a, 6 combine post
def _phases(ms: list[float]) -> dict[str, float]:
    return {"dispatch_ms": ms[0] + ms[1] + ms[2], "dispatch_comm_ms": ms[1],
            "combine_ms": ms[4] + ms[5] + ms[6], "combine_comm_ms": ms[5]}


def bench_rank(rank: int, world: int, spec: BenchSpec) -> dict:
    """On every rank, inside an initialised process group: every scenario through every dispatcher."""
    from megatron.core import parallel_state as ps

    on_gpu = torch.cuda.is_available() and dist.get_backend() == "nccl"
    if not ps.model_parallel_is_initialized():
        # On CPU the caller (cpu/bench_dispatch.py) installs the CPU stand-ins first: this
        # production module never imports the CPU harness.
        ps.initialize_model_parallel(expert_model_parallel_size=world, create_gloo_process_groups=False)
    ep_rank = ps.get_expert_model_parallel_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if (spec.dtype == "bf16" and on_gpu) else torch.float32
    T = spec.tokens_per_rank
    mine = rr.rank_slices(T, world)[ep_rank]
    out: dict = {"rank": ep_rank, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                 "timed": on_gpu, "limits": {}, "results": []}
    built: dict = {}
    for name in spec.dispatchers:
        limit = backend_limit(name)
        if limit is None:
            try:
                built[name] = _dispatcher(spec, name, on_gpu)
            except Exception as exc:
                limit = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if limit is not None:
            out["limits"][name] = limit
    for i, sc in enumerate(spec.scenarios):
        rmap_g = rr.routing_map(sc["counts"], T * world, spec.topk, seed=spec.seed + i)
        probs_g = rr.routing_probs(rmap_g, seed=spec.seed + i)
        x_g = torch.randn(T * world, spec.hidden_size, generator=torch.Generator().manual_seed(spec.seed + 100 + i))
        rmap, probs = rmap_g[mine].to(device), probs_g[mine].to(device)
        x = x_g[mine].to(device=device, dtype=dtype)
        expected = (x.float() * probs.sum(-1, keepdim=True)).to(dtype)
        outputs = {}
        for name, d in built.items():
            row: dict = {"scenario": i, "dispatcher": name}
            try:
                y, tpe = _one_pass(d, x, rmap, probs, _Timer(False))
                row["tokens_per_local_expert"] = [int(v) for v in torch.as_tensor(tpe).cpu().tolist()]
                row["max_abs_error"] = float((y.float() - expected.float()).abs().max()) if y.numel() else 0.0
                outputs[name] = y.float().cpu()
                if on_gpu:
                    times = []
                    for it in range(spec.warmup + spec.iters):
                        dist.barrier()
                        timer = _Timer(True)
                        _one_pass(d, x, rmap, probs, timer)
                        if it >= spec.warmup:
                            times.append(_phases(timer.intervals_ms()))
                    row["ms"] = {k: statistics.median(t[k] for t in times) for k in times[0]}
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            out["results"].append(row)
        if "alltoall" in outputs and "allgather" in outputs:
            out.setdefault("alltoall_vs_allgather", []).append(
                float((outputs["alltoall"] - outputs["allgather"]).abs().max()) if outputs["alltoall"].numel() else 0.0)
    return out


def torchrun_main(spec: BenchSpec) -> list[dict] | None:
    """Under torchrun: NCCL on GPUs (gloo without), every rank's results gathered on rank 0
    (None on the other ranks)."""
    import os

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        mine = bench_rank(dist.get_rank(), dist.get_world_size(), spec)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.destroy_process_group()
    return gathered if int(os.environ.get("RANK", "0")) == 0 else None
