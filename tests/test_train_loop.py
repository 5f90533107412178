"""The counting contract through Megatron-LM's own `train()` -> `train_step` loop on CPU.

Every iteration Megatron trains is counted once, in the record that reports it;
nothing else (evaluation, re-runs, iterations before a resume) is counted. Each
record is checked against iterations x global batch x sequence x top-k, computed
here from the configuration, not from the probe.
"""

import pytest

import megatron_train_loop as loop
from megatron_moe_probe.cpu.cluster import TinyMoEConfig, run_ranks
import numpy as np

from megatron_moe_probe.record import load_arrays, load_run

CFG = TinyMoEConfig()
WORLD = 2
EVAL = ("--eval-interval", "2", "--eval-iters", "1")


def _check_records(out, first: int, last: int, interval: int):
    """Records at every multiple of `interval` after `first` and at `last`, each holding exactly
    its own iterations' tokens; returns them."""
    _, reports = load_run(out)
    expected_steps = sorted({s for s in range(first + 1, last + 1) if s % interval == 0} | {last})
    assert [r.step for r in reports] == expected_steps
    previous = first
    per_iteration = loop.tokens_per_iteration(CFG, WORLD)
    for r in reports:
        assert r.steps == r.step - previous, (r.step, r.steps)
        for layer, counts in zip(r.layers, r.tokens_per_expert):
            assert sum(counts) == r.steps * per_iteration, (r.step, layer)
        # Per-iteration records: one row per iteration of the record, each one iteration of tokens.
        arrays = load_arrays(out, r)
        assert list(arrays["iterations"]) == list(range(previous + 1, r.step + 1))
        assert (arrays["tokens_per_expert"].sum(-1) == per_iteration).all()
        assert np.array_equal(arrays["tokens_per_expert"].sum(0), np.array(r.tokens_per_expert))
        previous = r.step
    return reports


def test_fresh_run_with_evaluation_counts_every_trained_iteration_once(tmp_path):
    out = str(tmp_path / "run")
    results = run_ranks(loop.run_megatron_train, WORLD, CFG, out, 5, 2, EVAL)
    assert results[0]["iteration"] == 5
    # Megatron evaluated at iterations 2, 4 (and at the end): routers ran in eval mode ...
    assert all(r["eval_router_calls"] > 0 for r in results)
    # ... and none of it is in the records: 2 + 2 + 1 iterations, from the first one on.
    reports = _check_records(out, 0, 5, 2)
    assert [r.steps for r in reports] == [2, 2, 1]
    assert all(r.meta["skipped_iterations"] == [] and r.meta["reruns"] == 0 for r in reports)


def test_resumed_run_counts_from_the_resumed_iteration(tmp_path):
    out = str(tmp_path / "run")
    run_ranks(loop.run_megatron_train, WORLD, CFG, out, 7, 2, (), 3)
    # Resumed at 3: a partial first interval (iteration 4), then 5-6, then the partial last (7).
    reports = _check_records(out, 3, 7, 2)
    assert [r.steps for r in reports] == [1, 2, 1]


def test_skipped_updates_are_counted_and_marked(tmp_path):
    out = str(tmp_path / "run")
    run_ranks(loop.run_megatron_train, WORLD, CFG, out, 4, 2, (), 0, (2, 3))
    reports = _check_records(out, 0, 4, 2)
    assert [r.meta["skipped_iterations"] for r in reports] == [[2], [3]]


def test_rerun_forward_backward_is_counted_once(tmp_path):
    # report_stats makes Megatron's rerun state machine run every iteration's forward and
    # backward twice (it measures non-determinism): the tokens of one iteration, once.
    out = str(tmp_path / "run")
    run_ranks(loop.run_megatron_train, WORLD, CFG, out, 4, 2, ("--rerun-mode", "report_stats"))
    reports = _check_records(out, 0, 4, 2)
    assert [r.meta["reruns"] for r in reports] == [2, 2]


def test_graphs_captured_before_the_probe_refuse_it_and_training_goes_on(tmp_path):
    out = tmp_path / "run"
    results = run_ranks(loop.run_megatron_train, WORLD, CFG, str(out), 3, 2, (), 0, (), True)
    assert results[0]["iteration"] == 3  # trained to the end
    refusals = [m for m in results[-1]["messages"] if "not started" in m]
    assert len(refusals) == 1 and "full_iteration" in refusals[0]
    assert not (out / "intervals.jsonl").exists()


@pytest.mark.parametrize("dispatcher", ["allgather"])
def test_other_dispatcher_through_the_loop(tmp_path, dispatcher):
    out = str(tmp_path / "run")
    cfg = CFG.with_(dispatcher=dispatcher)
    run_ranks(loop.run_megatron_train, WORLD, cfg, out, 3, 3)
    _, reports = load_run(out)
    assert [(r.step, r.steps) for r in reports] == [(3, 3)]
    assert all(sum(c) == 3 * loop.tokens_per_iteration(cfg, WORLD) for c in reports[0].tokens_per_expert)


def test_a_contributor_counts_with_the_router_and_can_stop_training_cleanly(tmp_path):
    """The session's extension point through Megatron's real loop: a contributor's parts ride on
    the flush (its numbers in meta.extras, from the same gate as the router's counts), and its
    stop request ends train() at that iteration boundary through Megatron's own exit."""
    from megatron_moe_probe.megatron.training import STOP_EXIT_CODE

    out = str(tmp_path / "run")
    results = run_ranks(loop.run_megatron_train, WORLD, CFG, out, 8, 2, EVAL, 0, (), False, 4)
    assert all(r["exit_code"] == STOP_EXIT_CODE for r in results)
    reports = _check_records(out, 0, 4, 2)  # iterations 1-4 recorded, in two records, then stopped
    tokens_per_router_call = CFG.micro_batch_size * CFG.seq_length
    for r in reports:
        block = r.meta["extras"]["token_check"]
        # Router calls of trained iterations only (no evaluation): micro-batches x ranks x iterations.
        calls = r.steps * loop.GRAD_ACC * WORLD
        assert block["tokens"] == [calls * tokens_per_router_call] * len(r.layers)
        assert block["half_tokens"] == [calls * tokens_per_router_call / 2] * len(r.layers)  # the float64 buffer
    assert any("stopping training after iteration 4" in m for m in results[-1]["messages"])
