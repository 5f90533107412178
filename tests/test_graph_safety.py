"""The probe must not stop Megatron's local CUDA graphs: no user forward pre-hooks on graphed
modules (Megatron asserts on them when it replays a graph), and method wrappers that stack and
come off in any order."""

import torch

import megatron_jobs as jobs
from megatron_moe_probe.cpu.cluster import TinyMoEConfig, run_ranks
from megatron_moe_probe.megatron.method_wrap import MethodWrap


def test_live_pieces_leave_no_pre_hooks_megatron_refuses():
    cfg = TinyMoEConfig().with_(capacity_factor=0.5, aux_loss_coeff=0.0)
    results = run_ranks(jobs.graph_safety, 2, cfg)
    tokens = cfg.micro_batch_size * cfg.seq_length
    for res in results:
        assert res["pre_hooks"] == [], res["pre_hooks"]
        assert res["refused"] is None, res["refused"]
        assert set(res["contributors"]) == {"integrity", "router_health"}
        # Counting through the routing wrapper still splits kept and dropped: per layer, the
        # demand of one step on both ranks, by hand.
        kept, dropped = res["tokens"].sum(1), res["dropped"].sum(1)
        assert torch.all(dropped > 0)
        assert torch.equal(kept + dropped, torch.full_like(kept, 2 * tokens * cfg.topk))


class Thing:
    def f(self, x):
        return x + 1


def _adder(n, calls):
    def make(original):
        def wrapped(x):
            calls.append(n)
            return original(x) + n
        return wrapped
    return make


def test_method_wraps_stack_and_come_off_in_any_order():
    for order in ((0, 1, 2), (2, 1, 0), (1, 0, 2), (0, 2, 1)):
        t, calls = Thing(), []
        wraps = [MethodWrap(t, "f", _adder(n, calls)) for n in (10, 20, 30)]
        assert t.f(0) == 61 and calls == [30, 20, 10]
        removed = set()
        for i in order:
            wraps[i].remove()
            removed.add(i)
            calls.clear()
            live = [n for j, n in enumerate((10, 20, 30)) if j not in removed]
            assert t.f(0) == 1 + sum(live), (order, i)
            assert sorted(calls) == sorted(live)
        assert "f" not in t.__dict__, order  # nothing left on the instance, passthroughs included


def _demand(cfg, forwards, world=2):
    """Assignments per layer (kept + dropped) of `forwards` micro-batches on every rank, by hand."""
    return world * forwards * cfg.micro_batch_size * cfg.seq_length * cfg.topk


def test_replays_outside_an_iteration_count_nothing_dropless_and_capacity():
    for cfg in (TinyMoEConfig(), TinyMoEConfig().with_(capacity_factor=0.5, aux_loss_coeff=0.0)):
        results = run_ranks(jobs.graph_replays, 2, cfg)
        want = _demand(cfg, 3)  # iteration 1: two micro-batches, iteration 2: one; not the one between
        for res in results:
            counted = res["tokens"].sum(1)
            if res["dropped"] is not None:
                counted = counted + res["dropped"].sum(1)
            assert torch.equal(counted, torch.full_like(counted, want)), (counted, want)
            # The exchange check and router health skip captured calls, and the record says so.
            assert "captured in a CUDA graph" in " ".join(res["extras"]["integrity"]["unchecked"])
            assert res["extras"]["integrity"]["count_calls"] == 0
            health = res["extras"]["router_health"]
            assert health["unsampled_layers"] == sorted(health["unsampled_layers"]) != []
