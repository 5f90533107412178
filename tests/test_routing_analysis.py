"""Analysis of per-iteration and per-domain records (issue 14): every number against hand
arithmetic on small counts written through the real record path (Snapshot -> build_report ->
run folder with its iterations/*.npz)."""

import json
import math

import numpy as np
import pytest
import torch

from megatron_moe_probe.analysis import domains as dom
from megatron_moe_probe.analysis.placement import balanced_placement
from megatron_moe_probe.analysis.run_analysis import AnalysisOptions, analyze
from megatron_moe_probe.analysis.runs import load_window
from megatron_moe_probe.accumulator import Snapshot
from megatron_moe_probe.record import load_arrays, load_run, write_run
from megatron_moe_probe.summarize import build_report


def snapshot(step, per_iteration, ep=2, domain_counts=None, names=()):
    """A Snapshot as the probe makes it from per-iteration [S, L, E] counts (one EP source)."""
    hist = torch.tensor(per_iteration, dtype=torch.long)
    S, L, E = hist.shape
    total = hist.sum(0)
    source = torch.zeros(L, ep, E, dtype=torch.long)
    source[:, 0] = total
    locality = torch.zeros(L, 3, dtype=torch.long)
    locality[:, 0] = total.sum(-1)
    snap = Snapshot(step=step, steps=S, layers=list(range(1, L + 1)), num_experts=E, ep_size=ep,
                    tokens_per_expert=total, step_tokens_per_expert=hist, source_expert_counts=source,
                    locality=locality, meta={"topk": 1, "gpus_per_node": 8})
    if domain_counts is not None:
        snap.domain_tokens_per_expert = torch.tensor(domain_counts, dtype=torch.long)
        snap.domains = list(names)
    return snap


def make_run(folder, intervals, meta=None):
    reports = [build_report(snapshot(**kw)) for kw in intervals]
    write_run(folder, reports, meta or {"args": {"hidden_size": 8, "micro_batch_size": 1, "seq_length": 4}})
    return folder


def test_per_iteration_arrays_round_trip_and_size(tmp_path):
    it = [[[4, 0, 0, 0]], [[0, 0, 0, 4]]]
    run = make_run(tmp_path / "r", [{"step": 2, "per_iteration": it}])
    _, reports = load_run(run)
    arrays = load_arrays(run, reports[0])
    assert reports[0].arrays_file == "iterations/step_000000002.npz"
    assert arrays["tokens_per_expert"].tolist() == it and arrays["iterations"].tolist() == [1, 2]
    assert "arrays" not in json.loads((run / "intervals.jsonl").read_text().splitlines()[0])
    # The figure of docs/metrics.md: 1000 iterations x 48 layers x 128 experts, counts of a
    # 1M-token top-8 global batch (uint32 needed), compressed .npz below the raw int32 size.
    rng = np.random.default_rng(0)
    big = rng.multinomial(1_048_576 * 8 // 1, np.full(128, 1 / 128), size=(100, 48)).astype(np.int64)
    report = build_report(snapshot(100, big, ep=8))
    path = write_run(tmp_path / "big", [report]) / report.arrays_file
    assert report.arrays["tokens_per_expert"].dtype == np.uint32
    per_1000 = path.stat().st_size * 10
    assert per_1000 < 1000 * 48 * 128 * 4  # 24.6 MB raw int32


def test_ep_whatif_uses_each_iterations_imbalance(tmp_path):
    # Two iterations, each with all tokens on one EP rank's experts; together they balance.
    run = make_run(tmp_path / "r", [{"step": 2, "per_iteration": [[[4, 0, 0, 0]], [[0, 0, 0, 4]]]}])
    result = analyze(load_window(run), AnalysisOptions(ep=[2], tokens_per_rank=4))
    ep2 = result["ep_whatif"]["by_ep"][0]
    assert ep2["window"] == [1.0]  # [4, 4] per rank
    assert ep2["iteration_mean"] == [2.0] and ep2["worst_iteration"] == [2.0]  # [4, 0] each iteration
    # Cost model per iteration: all of one iteration's traffic goes to one rank. Modelled matrix
    # M[s, r] = L_r / 2; with EP=2 on one node only the off-diagonal cell crosses NVLink: the
    # skewed iteration moves the whole rank's load off one source, the balanced one half.
    cost = result["cost"]["by_ep"]
    modelled = [e for e in cost if e["source"] == "modelled"][0]["layers"][0]
    fabric = result["cost"]["fabric"]
    total = 4 * 1 * 2 * 8 * 4  # tokens/rank x topk x EP x (hidden x fp32 bytes)
    lat = fabric["latency_us"] * 1e-6
    bw = fabric["intra_node_gb_s"] * 1e9
    balanced = lat + (total / 4) / bw  # each rank receives total/4 from the other
    skewed = lat + (total / 2) / bw  # the hot rank receives L/2 = total/2 from the other
    assert modelled["penalty_iteration_mean"] == pytest.approx(skewed / balanced)
    assert modelled["penalty"] == pytest.approx(1.0)  # the window's average hides it


def test_placement_test_window_per_iteration(tmp_path):
    run = make_run(tmp_path / "r", [
        {"step": 2, "per_iteration": [[[6, 2, 1, 1]], [[6, 2, 1, 1]]]},
        {"step": 4, "per_iteration": [[[8, 0, 0, 0]], [[0, 0, 0, 8]]]},
    ])
    result = analyze(load_window(run), AnalysisOptions(ep=[2], target_ep=2, replicate=0, tokens_per_rank=4))
    row = result["placement"]["layers"][0]
    # contiguous on each test iteration: [8, 0] and [0, 8] -> 2.0 both; on the test sum 1.0.
    assert row["contiguous"]["test"] == 1.0 and row["contiguous"]["test_iteration_mean"] == 2.0
    mapping = row["balanced"]["mapping"]
    loads = [[sum(it[e] for e in rank) for rank in mapping] for it in ([8, 0, 0, 0], [0, 0, 0, 8])]
    expect = sum(max(l) / (sum(l) / 2) for l in loads) / 2
    assert row["balanced"]["test_iteration_mean"] == pytest.approx(expect)


def test_js_divergence_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = math.log2(1 / 0.75)
    assert dom.js_divergence(p, q).tolist() == pytest.approx([1.0, 0.5 * (kl_p + kl_q)])
    assert dom.js_divergence(p, p).tolist() == pytest.approx([0.0, 0.0])


def test_domains_divergence_and_cross_domain_placement(tmp_path):
    # Domain A uses experts 0 and 1, B experts 1 and 2 (E=4, EP=2, one layer).
    a, b = [10, 10, 0, 0], [0, 10, 10, 0]
    run = make_run(tmp_path / "r", [{"step": 1, "per_iteration": [[[10, 20, 10, 0]]],
                                     "domain_counts": [[a], [b]], "names": ["code", "math"]}])
    result = analyze(load_window(run), AnalysisOptions(ep=[2], target_ep=2, tokens_per_rank=4))
    d = result["domains"]
    assert d["names"] == ["code", "math"] and d["share"] == [0.5, 0.5]
    # popularity [.5,.5,0,0] vs [0,.5,.5,0]: m = [.25,.5,.25,0]; KL = .5*log2(2) = .5 each way.
    assert d["divergence"][0][1] == pytest.approx([0.5]) and d["divergence"][0][0] == pytest.approx([0.0])
    table = d["cross_domain_placement"]["table"]
    # Contiguous: code -> ranks [20, 0] = 2.0; math -> [10, 10] = 1.0.
    assert table[0][0]["contiguous"] == [2.0] and table[1][1]["contiguous"] == [1.0]
    for f, fit in enumerate((a, b)):
        mapping = balanced_placement(fit, 2)
        for t, test in enumerate((a, b)):
            loads = [sum(test[e] for e in rank) for rank in mapping]
            placed = max(loads) / (sum(loads) / 2)
            assert table[f][t]["busiest_over_mean"] == [pytest.approx(placed)]
            assert table[f][t]["gain"] == [pytest.approx(table[f][t]["contiguous"][0] / placed)]
    assert table[0][0]["gain"] == [2.0]  # in-domain: code balanced exactly


def test_drift_between_windows(tmp_path):
    run = make_run(tmp_path / "r", [{"step": 1, "per_iteration": [[[4, 0, 0, 0]]]},
                                    {"step": 2, "per_iteration": [[[4, 0, 0, 0]]]},
                                    {"step": 3, "per_iteration": [[[0, 0, 0, 4]]]}])
    drift = dom.drift_section(load_window(run), windows=3)
    assert drift["windows"] == ["1-1", "2-2", "3-3"]
    assert drift["from_first"] == [[0.0], [0.0], [1.0]]
    assert drift["from_previous"][1:] == [[0.0], [1.0]]


def test_batch_size_sweep_and_direction(tmp_path):
    small = make_run(tmp_path / "small", [{"step": 2, "per_iteration": [[[4, 0, 0, 0]], [[0, 0, 0, 4]]]}],
                     {"args": {"micro_batch_size": 1, "global_batch_size": 1, "seq_length": 4}})
    big = make_run(tmp_path / "big", [{"step": 2, "per_iteration": [[[4, 4, 0, 0]], [[0, 0, 4, 4]]]}],
                   {"args": {"micro_batch_size": 2, "global_batch_size": 2, "seq_length": 4}})
    sweep = dom.batch_size_sweep([load_window(big), load_window(small)])
    runs = sweep["runs"]
    assert [r["global_batch_size"] for r in runs] == [1, 2]
    # Gini of [4,0,0,0] = (2*4-4-1)*4/(4*4) = 0.75; of [4,4,0,0] = ((2*3-5)*4+(2*4-5)*4)/(4*8) = 0.5.
    assert runs[0]["gini_step"] == pytest.approx(0.75) and runs[1]["gini_step"] == pytest.approx(0.5)
    assert runs[0]["assignments_per_iteration"] == 4 and runs[1]["assignments_per_iteration"] == 8
    assert dom.direction(0.5, "mock", "text") == "per-iteration Gini: mock lower than text (median ratio A/B 0.500)"
    assert "higher" in dom.direction(2.35, "mock", "text")


def test_analyze_command_prints_domains_and_plots(tmp_path, capsys):
    from megatron_moe_probe.cli import main

    run = make_run(tmp_path / "r", [{"step": 1, "per_iteration": [[[10, 20, 10, 0]]],
                                     "domain_counts": [[[10, 10, 0, 0]], [[0, 10, 10, 0]]], "names": ["code", "math"]},
                                    {"step": 2, "per_iteration": [[[0, 20, 10, 10]]],
                                     "domain_counts": [[[0, 10, 0, 10]], [[0, 10, 10, 0]]], "names": ["code", "math"]}])
    other = make_run(tmp_path / "o", [{"step": 2, "per_iteration": [[[12, 10, 10, 8]], [[12, 10, 10, 8]]]}])
    assert main(["analyze", str(run), "--ep", "2", "--tokens-per-rank", "4", "--against", str(other),
                 "--sweep", str(other), "--plot-dir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    for title in ("Jensen-Shannon divergence", "Placement fitted on one domain", "Drift", "Batch-size sweep",
                  "higher than B"):
        assert title in out, title
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert names == {"domains_heatmap.png", "domain_divergence.png", "cross_domain_placement.png", "drift.png",
                     "batch_size.png", "mock_vs_real.png"}


def test_build_domains_makes_four_indexed_datasets(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_moe_probe.megatron.data import blend_arguments, build_domains

    results = build_domains(str(tmp_path), max_bytes=20_000)
    assert [r.prefix.rsplit("/", 1)[-1] for r in results] == ["code", "prose", "math", "data"]
    for r in results:
        ds = IndexedDataset(r.prefix)
        assert len(ds) == r.documents > 0 and 0 < r.tokens <= 20_000 + r.documents
    assert blend_arguments(results)[:3] == ["--data-path", "1", results[0].prefix]


def test_unmodified_scripts_get_domains_from_the_data_iterator():
    from megatron.core.rerun_state_machine import RerunDataIterator

    from megatron_moe_probe.megatron.training import peek_batch_domains

    class Session:
        seen = []

        def set_batch_domains(self, ids, seq_length):
            self.seen.append((ids.tolist(), seq_length))

    batches = [{"tokens": torch.zeros(2, 4), "dataset_id": torch.tensor([0, 1])},
               {"tokens": torch.zeros(2, 4), "dataset_id": torch.tensor([1, 1])}]
    session = Session()
    rerun = peek_batch_domains(RerunDataIterator(iter(batches)), session, 4)
    assert isinstance(rerun, RerunDataIterator) and peek_batch_domains(rerun, session, 4) is rerun
    next(rerun), next(rerun)
    plain = peek_batch_domains(iter(batches), session, 4)
    next(plain)
    assert session.seen == [([0, 1], 4), ([1, 1], 4), ([0, 1], 4)]
