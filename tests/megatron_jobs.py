"""Rank functions for the multi-process CPU tests (module level so `spawn` can import them).

Each job builds a real Megatron GPTModel with MoE layers, runs a few training
micro-batches with the probe attached, and returns, per rank, the probe's
snapshot plus ground truth read from the token dispatcher itself.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from megatron_moe_probe.cpu import cluster as cc
from megatron_moe_probe.session import open_session
from megatron_moe_probe.settings import ProbeSettings


def attach(model_chunks, domains=None, iteration_matrix=False, **settings):
    """A session on the model, without writers or a gated loop: every training forward counts,
    and the job calls `step()` / `snapshot()` itself."""
    settings = ProbeSettings.create(1000, history=100, iterations="matrix" if iteration_matrix else "counts",
                                    **settings)
    return open_session(model_chunks, settings, domains=domains)


def batch(cfg, rank: int, step: int) -> torch.Tensor:
    # Each data-parallel position gets its own data; TP peers must see the same tokens.
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_rank(with_context_parallel=True)
    g = torch.Generator().manual_seed(1000 * step + dp)
    return torch.randint(0, cfg.vocab_size, (cfg.micro_batch_size, cfg.seq_length), generator=g)


def dispatcher_truth(binding) -> dict:
    """What the dispatcher itself computed for its last forward (ground truth)."""
    d = binding.dispatcher
    name = type(d).__name__
    out = {"type": name, "ep_rank": d.ep_rank, "tp_rank": d.tp_rank}
    if name == "MoEAlltoAllTokenDispatcher":
        out["input_splits"] = None if d.drop_and_pad else torch.as_tensor(d.input_splits).tolist()
        out["output_splits"] = torch.as_tensor(d.output_splits).tolist() if d.output_splits is not None else None
        if getattr(d, "num_global_tokens_per_local_expert", None) is not None and d.num_local_experts > 1:
            per_local = torch.as_tensor(d.num_global_tokens_per_local_expert).reshape(-1, d.num_local_experts).sum(0)
        else:  # one local expert: everything received is for it
            per_local = torch.tensor([sum(out["output_splits"])])
        out["per_local_expert"] = per_local.tolist()
        out["local_tokens"] = int(d.routing_map.shape[0])
        out["num_out_tokens"] = int(d.num_out_tokens)  # rows the dispatcher permutes and sends
    elif name == "MoEAllGatherTokenDispatcher":
        out["per_local_expert"] = d.local_map.sum(0).tolist()
        # The gathered map holds every TP x EP rank's tokens in group-rank order, so its
        # local-expert columns, summed per source block, are this rank's column of the matrix.
        group = dist.get_world_size(d.tp_ep_group)
        lm = d.local_map
        out["received_from"] = lm.view(group, lm.shape[0] // group, -1).sum((1, 2)).tolist()
    return out


def probe_vs_dispatcher(rank, world, cfg, steps=3, capture=True):
    return _each_variant(rank, cfg, {None: {}}, steps, capture)[None]


def _each_variant(rank, cfg, variants: dict, steps: int, capture: bool):
    """Same seed and data for every variant of cfg: {key: changes} -> {key: probe result}."""
    out = {}
    for key, changes in variants.items():
        c = cfg.with_(**changes)
        cc.init_parallel(c) if not out else _reseed(c)
        model = cc.build_model(c)
        probe = attach([model])
        truth = []
        for step in range(steps):
            cc.forward_backward(model, batch(c, rank, step))
            if capture:
                truth.append({b.slot: dispatcher_truth(b) for b in probe.bindings})
            probe.step()
        out[key] = {"snapshot": probe.snapshot(), "truth": truth, "layout": probe.layout}
        probe.detach()
    return out


def _reseed(cfg):
    from megatron.core.tensor_parallel import random as mc_random

    torch.manual_seed(cfg.seed)
    mc_random.model_parallel_cuda_manual_seed(cfg.seed)


def capacity_pair(rank, world, cfg, steps=2):
    """The same model and data with and without padding to capacity."""
    return _each_variant(rank, cfg, {pad: {"pad_to_capacity": pad} for pad in (False, True)}, steps, True)


def recompute_pair(rank, world, cfg, steps=2):
    """Counts with full activation recomputation must equal counts without it."""
    both = _each_variant(rank, cfg, {r: {"recompute": r} for r in (False, True)}, steps, False)
    return {key: result["snapshot"] for key, result in both.items()}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def bitwise_on_off(rank, world, cfg, steps=2):
    """Loss and gradients with the probe attached vs not: must be identical bit for bit."""
    results = {}
    for with_probe in (False, True):
        _reseed(cfg) if results else cc.init_parallel(cfg)
        model = cc.build_model(cfg)
        probe = attach([model]) if with_probe else None
        losses, grads = [], []
        for step in range(steps):
            model.zero_grad(set_to_none=True)
            losses.append(cc.forward_backward(model, batch(cfg, rank, step)))
            grads.append(_grads(model))
            if probe:
                probe.step()
        if probe:
            probe.snapshot()
            probe.detach()
        results[with_probe] = (losses, grads)
    (l0, g0), (l1, g1) = results[False], results[True]
    same_loss = all(torch.equal(a, b) for a, b in zip(l0, l1))
    same_grads = all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(g0, g1))
    return {"same_loss": same_loss, "same_grads": same_grads, "n_grads": len(g0[0])}


# Ops that only make a view of existing storage: no kernel, no copy.
VIEW_OPS = {"select", "slice", "view", "as_strided", "alias", "unsqueeze", "squeeze"}
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "tolist", "_to_copy", "to", "cpu", "numpy"}


class _OpCounter:
    """Counts aten ops (TorchDispatchMode) and host-side collectives during a region."""

    def __init__(self):
        from collections import Counter

        self.ops = Counter()
        self.collectives = Counter()

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        self._saved = {}
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier",
                     "reduce_scatter_tensor", "all_to_all_single", "gather", "reduce"):
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapped(*a, _name=name, _orig=original, **k):
                counter.collectives[_name] += 1
                return _orig(*a, **k)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(dist, name, original)


def host_sync_audit(rank, world, cfg):
    """Ops and collectives of one non-logging training step, probe off vs on."""
    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    cc.forward_backward(model, batch(cfg, rank, 0))  # warm-up (lazy init) outside the audit
    with _OpCounter() as off:
        cc.forward_backward(model, batch(cfg, rank, 1))
    probe = attach([model], integrity="off")
    # The counting path alone: router health and the integrity check have their own audit
    # (tests/test_integrity.py::test_checks_add_no_host_sync_or_collective).
    for c in [c for c in probe.contributors if c.name == "router_health"]:
        c.detach()
        probe.contributors.remove(c)
    with _OpCounter() as on:
        cc.forward_backward(model, batch(cfg, rank, 1))
        probe.step()
    with _OpCounter() as flush:
        probe.snapshot()
    probe.detach()
    added = {k: on.ops[k] - off.ops.get(k, 0) for k in on.ops if on.ops[k] != off.ops.get(k, 0)}
    return {
        "added_ops": added,
        "removed_ops": {k: v for k, v in off.ops.items() if on.ops.get(k, 0) < v},
        "collectives_off": dict(off.collectives),
        "collectives_on": dict(on.collectives),
        "flush_collectives": dict(flush.collectives),
        "moe_layers": len(probe.bindings),
    }


def error_in_hook(rank, world, cfg):
    """A failing probe must not break training: the step completes, the probe disables itself."""
    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    probe = attach([model])
    messages = []

    class Grab(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("megatron_moe_probe").addHandler(Grab())

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    from megatron_moe_probe import colsum

    colsum.add_column_sums = boom  # the hook's one kernel call (this process only)
    loss = cc.forward_backward(model, batch(cfg, rank, 0))
    loss2 = cc.forward_backward(model, batch(cfg, rank, 1))
    return {"loss": float(loss), "loss2": float(loss2), "enabled": probe.enabled, "messages": messages}


def layout_only(rank, world, cfg):
    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    probe = attach([model])
    layout = probe.layout
    probe.detach()
    return layout


def session_run(rank, world, cfg, out_dir, steps, interval, timing, timing_every=1):
    """A session as a training loop uses it: writers on the last rank, flush at close."""
    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    settings = ProbeSettings.create(interval, writers=["local"], out_dir=out_dir, timing=timing, gpus_per_node=1,
                                    timing_every=timing_every)
    session = open_session([model], settings, run_meta={"test": True}, writer=rank == world - 1)
    flushed = []
    last = train_steps(session, model, cfg, rank, steps, on_report=flushed.append)
    session.close(last)
    return {"flushed": flushed, "reports": session.reports_written}


def train_steps(session, model, cfg, rank: int, steps: int, on_iteration=None, on_report=None) -> int:
    """Iterations 1..steps as a training loop drives a session (SGD, gradients all-reduced), until
    a contributor asks training to stop; on_iteration(it) before each, on_report(it) after a
    flush. Returns the last iteration run."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    it = 0
    for it in range(1, steps + 1):
        if on_iteration is not None:
            on_iteration(it)
        optimizer.zero_grad()
        session.start_step()
        cc.forward_backward(model, batch(cfg, rank, it))
        cc.allreduce_gradients(model)
        optimizer.step()
        if session.after_step(it) is not None and on_report is not None:
            on_report(it)
        if session.stop_requested is not None:
            break
    return it


def pipeline_layers(rank, world, cfg):
    """Which global layers each pipeline (and virtual) stage's routers claim, and what a
    flush reports on every rank (no forward needed: the flush is a collective)."""
    cc.init_parallel(cfg)
    stages = range(cfg.vpp) if cfg.vpp else [None]
    chunks = [cc.build_model(cfg, vp_stage=v) for v in stages]
    probe = attach(chunks)
    probe.step()
    snap = probe.snapshot()
    probe.detach()
    return {"slots": sorted(b.slot for b in probe.bindings), "reported": snap.layers}


def attach_to_dense_model(rank, world, cfg):
    """A model without MoE layers: attach must refuse with a message naming the problem."""
    from megatron_moe_probe.megatron.hooks import ProbeSetupError

    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    try:
        attach([model])
    except ProbeSetupError as exc:
        return str(exc)
    return None


# ---- per-iteration and per-domain counts on a real blend of two datasets -------------------------

def build_two_domain_blend(folder: str) -> list[str]:
    """Two byte-tokenized indexed datasets whose domain shows in every token: ASCII letters
    (bytes < 128) and Greek letters (UTF-8 bytes >= 128). Returns their prefixes."""
    import os
    import random

    from megatron_moe_probe.megatron.data import build

    rnd = random.Random(7)
    prefixes = []
    for name, alphabet in (("ascii", "abcdefghijklmnopqrstuvwxyz"), ("greek", "αβγδεζηθικλμνξοπρστυφχψω")):
        src = os.path.join(folder, name + ".txt")
        with open(src, "w", encoding="utf-8") as f:
            for _ in range(40):
                f.write("".join(rnd.choice(alphabet) for _ in range(rnd.randint(50, 300))) + "\n")
        prefix = os.path.join(folder, name)
        build([src], prefix, split_lines=True, progress=False)
        prefixes.append(prefix)
    return prefixes


def blended_dataset(prefixes: list[str], cfg, num_samples: int, cache: str):
    """Megatron's own BlendedDataset over the prefixes (equal weights), built as pretraining does."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    config = GPTDatasetConfig(random_seed=1, sequence_length=cfg.seq_length, blend=(prefixes, [0.5] * len(prefixes)),
                              split="1,0,0", tokenizer=NullTokenizer(257), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, path_to_cache=cache)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


def domains_vs_dispatcher(rank, world, cfg, prefixes, cache, steps=3, matrix=True):
    """Micro-batches drawn from a real two-dataset BlendedDataset; the probe gets each sample's
    dataset id before the forward. Returns the snapshot and, per step, the dispatcher's own
    routing map split by sample, with each sample's domain read from its tokens."""
    from megatron.core import parallel_state as ps
    from torch.utils.data import default_collate

    cc.init_parallel(cfg)
    dp = ps.get_data_parallel_rank(with_context_parallel=True)
    dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
    mbs = cfg.micro_batch_size
    data = blended_dataset(prefixes, cfg, mbs * steps * dp_size + 8, cache)
    model = cc.build_model(cfg)
    probe = attach([model], domains=["ascii", "greek"], iteration_matrix=matrix)
    truth = []
    for step in range(steps):
        first = (step * dp_size + dp) * mbs
        batch = default_collate([data[i] for i in range(first, first + mbs)])
        tokens = batch["tokens"]
        probe.set_batch_domains(batch["dataset_id"], cfg.seq_length)
        cc.forward_backward(model, tokens)
        per_layer = {}
        for b in probe.bindings:
            d = b.dispatcher
            rmap = d.routing_map  # [local tokens, E], sequence-major: [s_local, mbs] flattened
            per_sample = rmap.view(-1, mbs, rmap.shape[-1]).sum(0).long()  # [mbs, E]
            per_layer[b.slot] = {"per_sample": per_sample, "dispatcher": dispatcher_truth(b)}
        truth.append({"layers": per_layer, "dataset_id": batch["dataset_id"].tolist(),
                      "greek_from_tokens": [bool((t >= 128).all()) for t in tokens],
                      "ascii_from_tokens": [bool((t < 128).all()) for t in tokens]})
        probe.step()
    snap = probe.snapshot()
    probe.detach()
    return {"snapshot": snap, "truth": truth, "layout": probe.layout}


def graph_safety(rank, world, cfg):
    """Every live piece on (counting with capacity dropping, sampled timing with backward, the
    integrity check, router health), then Megatron's own check that a layer may be graphed by
    `--cuda-graph-impl local`: any user forward pre-hook on a graphed module is refused."""
    from megatron.core.transformer.cuda_graphs import CudaGraphManager

    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    session = open_session([model], ProbeSettings.create(1000, timing="all", integrity="warn"))
    with_pre_hooks = [name for name, m in model.named_modules() if m._forward_pre_hooks]
    refused = None
    try:
        for module in model.modules():
            CudaGraphManager.call_ddp_preforward_hook(None, module)  # what a graph replay runs first
    except AssertionError as exc:
        refused = str(exc).split(",")[0]
    session.start_step()
    cc.forward_backward(model, batch(cfg, rank, 1))
    session.step()
    snap = session.snapshot()
    session.detach()
    return {"pre_hooks": with_pre_hooks, "refused": refused, "dropped": snap.dropped_per_expert,
            "tokens": snap.tokens_per_expert, "contributors": [c.name for c in session.contributors]}


def graph_replays(rank, world, cfg):
    """CUDA-graph replays, as far as a CPU can show them. The gate is told a capture is running
    (torch's own capture query replaced), so the hooks take their capture path; each forward
    then stands for one replay of the captured kernels. A training iteration's replay counts;
    a replay outside any iteration (Megatron's local graphs replay the training graph for
    evaluation) must count nothing, though every hook runs."""
    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    session = open_session([model], ProbeSettings.create(1000))
    gate = session.gate
    gate._cuda = True

    def replay(step):  # the capture query says yes only while the "graph" runs
        gate._capturing = lambda: True
        cc.forward_backward(model, batch(cfg, rank, step))
        gate._capturing = lambda: False

    session.start_step()  # a training iteration: replay twice (two micro-batches)
    replay(1)
    replay(2)
    session.after_step(1)
    replay(3)  # between iterations: the evaluation replay
    session.start_step()
    replay(4)
    session.after_step(2)
    snap = session.snapshot()
    blocks = dict(snap.extras)
    session.detach()
    return {"tokens": snap.tokens_per_expert, "dropped": snap.dropped_per_expert, "extras": blocks}
