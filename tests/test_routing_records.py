"""Per-iteration and per-domain counts (issue 14) on real Megatron-Core MoE layers on CPU.

Micro-batches come from Megatron's own BlendedDataset over two byte-tokenized datasets
whose domain is visible in every token (ASCII vs Greek letters). Every count is checked
against the token dispatcher's own routing map split by sample position and by the
domain read from the tokens, and against the dispatcher's split sizes per iteration.
"""

import numpy as np
import pytest
import torch

import megatron_jobs as jobs
from megatron_moe_probe.cpu.cluster import TinyMoEConfig, run_ranks
from megatron_moe_probe.summarize import build_report

BASE = TinyMoEConfig()
STEPS = 3


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blend")
    return jobs.build_two_domain_blend(str(folder)), str(folder / "cache")


def _expected(results, cfg):
    """Per step [L, E] counts and per-domain [D, L, E] interval counts from the dispatcher."""
    slots = sorted(results[0]["truth"][0]["layers"])
    E, L = cfg.num_experts, len(slots)
    per_step = torch.zeros(STEPS, L, E, dtype=torch.long)
    per_domain = torch.zeros(2, L, E, dtype=torch.long)
    step_matrix = torch.zeros(STEPS, L, 2, 2, dtype=torch.long)
    ep = results[0]["layout"].ep_size
    for res in results:
        for step, t in enumerate(res["truth"]):
            # The dataset id Megatron gave each sample is the domain its tokens show.
            assert t["ascii_from_tokens"] == [d == 0 for d in t["dataset_id"]]
            assert t["greek_from_tokens"] == [d == 1 for d in t["dataset_id"]]
            for i, slot in enumerate(slots):
                layer = t["layers"][slot]
                if layer["dispatcher"]["tp_rank"] != 0 and not cfg.sequence_parallel:
                    continue
                for sample, domain in enumerate(t["dataset_id"]):
                    per_domain[domain, i] += layer["per_sample"][sample]
                per_step[step, i] += layer["per_sample"].sum(0)
                splits = layer["dispatcher"].get("input_splits")
                if splits is not None and ep == 2:
                    step_matrix[step, i, layer["dispatcher"]["ep_rank"]] += torch.tensor(splits)
    return per_step, per_domain, step_matrix


def _check(results, cfg):
    per_step, per_domain, step_matrix = _expected(results, cfg)
    # Both domains occur (otherwise the split would prove nothing).
    assert (per_domain.sum((1, 2)) > 0).all()
    for res in results:
        snap = res["snapshot"]
        assert torch.equal(snap.step_tokens_per_expert, per_step)
        assert torch.equal(snap.domain_tokens_per_expert, per_domain), (snap.domain_tokens_per_expert, per_domain)
        assert snap.domains == ["ascii", "greek"]
        assert snap.meta["domain_unlabelled"] == 0
        # Sums over domains equal the totals; sums over iterations equal the interval.
        assert torch.equal(snap.domain_tokens_per_expert.sum(0), snap.tokens_per_expert)
        assert torch.equal(snap.step_tokens_per_expert.sum(0), snap.tokens_per_expert)
    snap = results[0]["snapshot"]
    # Independent total: iterations x ranks' tokens x top-k per layer.
    routers = 2 if cfg.tp == 1 or cfg.sequence_parallel else 1
    tokens = cfg.micro_batch_size * cfg.seq_length // (cfg.tp if cfg.sequence_parallel else 1)
    assert int(snap.tokens_per_expert[0].sum()) == STEPS * routers * tokens * cfg.topk
    report = build_report(snap)
    arrays = report.arrays
    assert arrays["tokens_per_expert"].shape == (STEPS, len(snap.layers), cfg.num_experts)
    assert np.array_equal(arrays["tokens_per_expert"].astype(np.int64).sum(0), np.array(report.tokens_per_expert))
    assert list(arrays["iterations"]) == [1, 2, 3]
    assert np.array_equal(arrays["domain_tokens_per_expert"].astype(np.int64).sum(0),
                          np.array(report.tokens_per_expert))
    assert report.domains == ["ascii", "greek"] and report.arrays_file.endswith(".npz")
    return snap, step_matrix, report


def test_alltoall_ep2_per_iteration_and_per_domain_counts_match_dispatcher(blend):
    prefixes, cache = blend
    results = run_ranks(jobs.domains_vs_dispatcher, 2, BASE, prefixes, cache, STEPS)
    snap, step_matrix, report = _check(results, BASE)
    # Per-iteration rank matrix: row s of iteration i = rank s's input_splits in that iteration.
    assert torch.equal(snap.step_rank_matrix, step_matrix)
    assert np.array_equal(report.arrays["rank_matrix"].astype(np.int64).sum(0), np.array(report.rank_matrix))


def test_sequence_parallel_slices_get_their_samples_domains(blend):
    # TP=2 with sequence parallelism: each TP rank's router sees half of the sequence.
    prefixes, cache = blend
    cfg = BASE.with_(tp=2, ep=1, sequence_parallel=True)
    results = run_ranks(jobs.domains_vs_dispatcher, 2, cfg, prefixes, cache, STEPS, False)
    snap, _, _ = _check(results, cfg)
    assert snap.step_rank_matrix is None
