"""Rank functions for the dispatch-integrity and router-health tests (module level for `spawn`).

Each job builds the real Megatron GPTModel of the CPU harness, attaches the counting probe and
the integrity / router-health contributors, optionally injects one fault into the exchange of
one layer on one rank (by wrapping the dispatcher's `token_dispatch` / `token_combine`, the
calls that move the rows between ranks), runs one interval and returns the verdict.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

import megatron_jobs as jobs
from megatron_moe_probe.cpu import cluster as cc

FAULTS = ("drop", "duplicate", "misroute", "bitflip")


def corrupt(rows: torch.Tensor, fault: str, first: int = 0, other: int = -1) -> torch.Tensor:
    """One fault in a [rows, hidden] tensor: row `first` lost (zeros), overwritten by a copy of
    row `other`, swapped with it (so each reaches the other's expert), or one bit of one of its
    values flipped."""
    out = rows.clone()
    if fault == "drop":
        out[first] = 0
    elif fault == "duplicate":
        out[first] = rows[other]
    elif fault == "misroute":
        out[first], out[other] = rows[other], rows[first]
    elif fault == "bitflip":
        bits = out.view(torch.int32) if out.element_size() == 4 else out.view(torch.int16)
        bits[first, 0] ^= 1 << 3
    else:
        raise ValueError(fault)
    return out


def inject(dispatcher, phase: str, fault: str, calls: list[int]) -> None:
    """Corrupt the rows `token_dispatch` (phase "dispatch") or `token_combine` ("combine") hand
    on, on the first forward call (calls[0] counts them)."""
    method = "token_dispatch" if phase == "dispatch" else "token_combine"
    original = getattr(dispatcher, method)

    def faulty(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] != 1 or not torch.is_grad_enabled():
            return out
        if phase == "dispatch":
            return (corrupt(out[0], fault, *_rows_that_matter(dispatcher)), *out[1:])
        return corrupt(out, fault)

    dispatcher.__dict__[method] = faulty


def _rows_that_matter(dispatcher) -> tuple[int, int]:
    """allgather: every rank gets every token and keeps those of its own experts, so fault a
    token this rank keeps and swap it with one it keeps for other experts (a fault in a row no
    expert here uses changes nothing on this rank, and is rightly not reported). alltoall:
    every received row is kept: the first and the last."""
    if type(dispatcher).__name__ != "MoEAllGatherTokenDispatcher":
        return 0, -1
    idx = dispatcher.local_expert_indices
    local = dispatcher.routing_map[:, idx[0]:idx[-1] + 1]
    kept = local.any(1).nonzero().flatten().tolist()
    other = next(j for j in kept if not torch.equal(local[j], local[kept[0]]))
    return kept[0], other


def inject_count(dispatcher) -> None:
    """The dispatcher's own tokens_per_expert is off by one (one token moved between two local
    experts): the experts would process the wrong segments."""
    original = dispatcher.dispatch_postprocess
    done = [False]

    def faulty(*args, **kwargs):
        rows, per_expert, probs = original(*args, **kwargs)
        if not done[0]:
            done[0] = True
            per_expert = per_expert.clone()
            per_expert[0] -= 1
            per_expert[1] += 1
        return rows, per_expert, probs

    dispatcher.__dict__["dispatch_postprocess"] = faulty


def exchange_check(session, **changes):
    """Add a dispatch integrity check to a session opened with integrity off (after any fault was
    put in, so the check's hooks sit outside the fault), as the session's factory would."""
    from megatron_moe_probe.megatron.exchange_check import ExchangeCheck

    settings = replace(session.settings, integrity=changes.pop("mode", "fail"),
                       integrity_payload_every=changes.pop("payload_every", 8))
    check = next(c for c in session.hooks.make_checks(session.gate, settings, request_stop=session.request_stop,
                                                      announce=True) if isinstance(c, ExchangeCheck))
    for name, value in changes.items():
        setattr(check, name, value)
    session.add_contributor(check)
    return check


def run_interval(session, model, cfg, rank: int, steps: int, microbatches: int = 1, start: int = 0) -> dict:
    """`steps` iterations of `microbatches` micro-batches each, then the interval's flush
    (the session's one all-reduce); the integrity block plus the stop requests it caused."""
    for step in range(start, start + steps):
        session.start_step()
        for mb in range(microbatches):
            cc.forward_backward(model, jobs.batch(cfg, rank, 10 * step + mb))
        session.gate.close_step()
        session.step()
    snap = session.snapshot(step=start + steps)
    out = dict(snap.extras["integrity"])
    out["stops"] = [session.stop_requested] if session.stop_requested else []
    session.stop_requested = None
    return out


def faults(rank, world, cfg, cases, steps=2):
    """{case: verdict} for each case = (phase, fault, layer slot, rank) or None (clean), each
    on a fresh model with the same seed; the fault hits one layer on one rank."""
    cc.init_parallel(cfg)
    out = {}
    for case in cases:
        jobs._reseed(cfg)
        model = cc.build_model(cfg)
        session = jobs.attach([model], integrity="off")
        if case is not None:
            phase, fault, slot, where = case
            binding = next(b for b in session.bindings if b.slot == slot)
            if rank == where:
                if fault == "count":
                    inject_count(binding.dispatcher)
                else:
                    inject(binding.dispatcher, phase, fault, [0])
        exchange_check(session)
        out[case] = run_interval(session, model, cfg, rank, steps)
        session.detach()
    return out


def clean_variants(rank, world, cfg, variants: dict, steps=2):
    """{key: verdicts of two intervals} for config variants without faults, through the session
    as the factory makes it (integrity on); the second interval runs with the payload check
    sampled every 2 iterations and 2 micro-batches per iteration."""
    from megatron_moe_probe.megatron.exchange_check import ExchangeCheck

    cc.init_parallel(cfg)
    out = {}
    for key, changes in variants.items():
        c = cfg.with_(**changes)
        jobs._reseed(c)
        model = cc.build_model(c)
        session = jobs.attach([model], integrity="fail", integrity_payload_every=1)
        next(x for x in session.contributors if isinstance(x, ExchangeCheck)).payload_every = 1
        first = run_interval(session, model, c, rank, steps)
        next(x for x in session.contributors if isinstance(x, ExchangeCheck)).payload_every = 2
        second = run_interval(session, model, c, rank, 3, microbatches=2, start=steps)
        session.detach()
        out[key] = (first, second)
    return out


def router_health(rank, world, cfg, steps=2):
    """The router-health block of one interval (the session's own contributor), plus every
    counted router call's own logits and routing map (recorded by a wrapper outside the
    contributor's) and each layer's expert bias, for a numpy recomputation in the test."""
    cc.init_parallel(cfg)
    jobs._reseed(cfg)
    model = cc.build_model(cfg)
    session = jobs.attach([model], integrity="off")
    next(c for c in session.contributors if c.name == "router_health").every = 1  # every call, for numpy
    calls, biases = [], {}
    g = torch.Generator().manual_seed(7)  # the same bias on every rank, as Megatron keeps it
    for b in session.bindings:
        if getattr(b.router, "expert_bias", None) is not None:
            b.router.expert_bias.copy_(torch.randn(cfg.num_experts, generator=g) * 0.1)
            biases[b.slot] = b.router.expert_bias.tolist()
        inner = b.router.routing

        def outer(logits, *a, _inner=inner, _b=b, **k):
            probs, routing_map = _inner(logits, *a, **k)
            if session.gate.should_count(_b.router):
                calls.append((_b.slot, logits.detach().reshape(-1, cfg.num_experts).double().numpy(),
                              routing_map.numpy().copy()))
            return probs, routing_map

        b.router.__dict__["routing"] = outer
    for step in range(steps):
        session.start_step()
        cc.forward_backward(model, jobs.batch(cfg, rank, step))
        session.gate.close_step()
        session.step()
    block = session.snapshot(step=steps).extras["router_health"]
    return {"block": block, "calls": calls, "biases": biases, "topk": cfg.topk}


def session_with_fault(rank, world, cfg, out_dir, steps, interval, fault_at, mode="fail"):
    """A training loop on the session (as the demo drives it) with `--moe-probe-integrity MODE`:
    one bit flipped in what token_dispatch hands on in layer 2 on rank 0 in iteration
    `fault_at` (0: none). Returns the iterations run, the stop reason and the logged errors."""
    import logging

    from megatron_moe_probe.session import open_session
    from megatron_moe_probe.settings import ProbeSettings

    errors: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    logging.getLogger("megatron_moe_probe").addHandler(Catch())
    cc.init_parallel(cfg)
    jobs._reseed(cfg)
    model = cc.build_model(cfg)
    settings = ProbeSettings.create(interval, writers=["local"], out_dir=out_dir, gpus_per_node=1, integrity=mode,
                                    integrity_payload_every=8)
    session = open_session([model], settings, run_meta={"test": True}, writer=rank == world - 1)
    iteration = [0]
    if fault_at and rank == 0:
        binding = next(b for b in session.bindings if b.slot == 1)
        original = binding.dispatcher.token_dispatch

        def faulty(*args, **kwargs):
            out = original(*args, **kwargs)
            if iteration[0] == fault_at and torch.is_grad_enabled():
                return (corrupt(out[0], "bitflip"), *out[1:])
            return out

        binding.dispatcher.__dict__["token_dispatch"] = faulty
    it = jobs.train_steps(session, model, cfg, rank, steps, on_iteration=lambda i: iteration.__setitem__(0, i))
    session.close(it)
    return {"iterations": it, "stop": session.stop_requested, "errors": errors}


def checks_audit(rank, world, cfg):
    """Ops and collectives the default session's contributors add (integrity warn + router
    health): on a sampled iteration (the first) and an unsampled one, and at the flush."""
    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    cc.forward_backward(model, jobs.batch(cfg, rank, 0))  # warm-up (lazy init) outside the audit
    with jobs._OpCounter() as off:
        cc.forward_backward(model, jobs.batch(cfg, rank, 1))
    plain = jobs.attach([model], integrity="off")
    for c in list(plain.contributors):
        c.detach()
        plain.contributors.remove(c)
    with jobs._OpCounter() as counting:
        cc.forward_backward(model, jobs.batch(cfg, rank, 1))
    plain.detach()
    session = jobs.attach([model])
    out = {"ops_off": dict(off.ops), "ops_counting": dict(counting.ops), "collectives_off": dict(off.collectives)}
    for name in ("sampled", "unsampled"):
        with jobs._OpCounter() as on:
            cc.forward_backward(model, jobs.batch(cfg, rank, 1))
            session.step()
        out[name] = {"ops": dict(on.ops), "collectives": dict(on.collectives)}
    with jobs._OpCounter() as flush:
        snap = session.snapshot(step=2)
    out["flush_collectives"] = dict(flush.collectives)
    out["integrity"] = snap.extras["integrity"]
    session.detach()
    return out
