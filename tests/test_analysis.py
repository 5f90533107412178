"""`moe-probe analyze` and megatron_moe_probe.analysis: every number against hand arithmetic
(small count vectors, worked out in the comments) or an independent numpy computation from
the raw records; end to end on a real 2xH200 run (tests/data) and a fresh CPU demo run."""

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_moe_probe import cli
from megatron_moe_probe.analysis import a2a_cost, bands, placement, whatif
from megatron_moe_probe.analysis import run_analysis
from megatron_moe_probe.analysis.run_analysis import AnalysisOptions
from megatron_moe_probe.analysis.mock_vs_real import compare_runs
from megatron_moe_probe.analysis.runs import load_window, parse_steps
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record import IntervalReport
from megatron_moe_probe.writers.local import LocalWriter

DATA = Path(__file__).parent / "data"
MOCK, TEXT = DATA / "h200_run_mock", DATA / "h200_run_text"
SKEWED = [10, 0, 0, 0, 2, 2, 2, 2]


def raw_records(run):
    return [json.loads(line) for line in (run / "intervals.jsonl").read_text().splitlines()]


def write_run(path, intervals, *, ep=2, layers=(1,), meta=None, per_layer=None, steps=None):
    """A run folder from [interval][layer][expert] counts, `steps[i]` iterations in interval i
    (default 10 each); rank 0 sends every token."""
    steps = steps or [10] * len(intervals)
    writer = LocalWriter(path)
    writer.write_meta(meta or {})
    for i, counts in enumerate(intervals):
        per_rank = [np.asarray(c).reshape(ep, -1).sum(1).tolist() for c in counts]
        writer.write(IntervalReport(
            step=sum(steps[:i + 1]), steps=steps[i], time=0.0, layers=list(layers), num_experts=len(counts[0]),
            ep_size=ep, per_layer=per_layer[i] if per_layer else [{} for _ in layers], tokens_per_expert=counts,
            rank_matrix=[[load] + [[0] * ep] * (ep - 1) for load in per_rank], meta={"topk": 2}))
    writer.close()
    return path


def analyze(capsys, *argv):
    code = cli.main(["analyze", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- EP what-if


def test_busiest_rank_by_hand():
    x = torch.tensor(SKEWED)
    # EP=2: ranks hold [10,0,0,0] and [2,2,2,2] -> loads [10, 8], mean 9
    assert float(whatif.busiest_rank_over_mean(x, 2)) == pytest.approx(10 / 9)
    # EP=4: loads [10, 0, 4, 4], mean 4.5
    assert float(whatif.busiest_rank_over_mean(x, 4)) == pytest.approx(10 / 4.5)
    # EP=8 = E: one expert per rank, so the per-expert max/mean 10 / 2.25
    assert float(whatif.busiest_rank_over_mean(x, 8)) == pytest.approx(10 / 2.25)
    assert whatif.ep_degrees(8) == [2, 4, 8]
    assert whatif.ep_degrees(12) == [2, 3, 4, 6, 12]
    for bad in (3, 16):
        with pytest.raises(UsageError, match="does not divide"):
            whatif.check_ep(8, bad)
    with pytest.raises(UsageError, match="positive"):
        whatif.check_ep(8, 0)


def test_ep_scan_window_and_worst_interval_by_hand():
    counts = torch.tensor([[SKEWED], [[0, 0, 0, 0, 4, 4, 4, 4]]])  # [interval, layer, expert]
    (scan,) = whatif.ep_scan(counts, [2])
    # summed: [10,0,0,0,6,6,6,6] -> loads [10, 24], mean 17; interval 1: 10/9; interval 2: [0, 16] -> 2
    assert scan["ep"] == 2
    assert scan["window"] == pytest.approx([24 / 17])
    assert scan["worst_interval"] == pytest.approx([2.0])


def test_modelled_matrix_and_check_by_hand():
    model = whatif.modelled_rank_matrix(torch.tensor(SKEWED), 2)
    # loads [10, 8] split evenly over the two sources
    assert model.tolist() == [[5, 4], [5, 4]]
    measured = torch.tensor([[[6, 3], [4, 5]]])  # column sums [10, 8] agree with the expert counts
    (row,) = whatif.matrix_check(measured, torch.tensor([SKEWED]))
    # cells against [[5,4],[5,4]]: |6-5|/5, |3-4|/4, |4-5|/5, |5-4|/4 -> largest 0.25
    assert row["max_cell_rel_error"] == pytest.approx(0.25)
    assert row["local_fraction_measured"] == pytest.approx(11 / 18)  # (6 + 5) / 18
    assert row["local_fraction_modelled"] == 0.5
    assert row["sender_skew_measured"] == pytest.approx(1.0)  # rows [9, 9]
    # from other ranks: rank 0 gets 4 (from rank 1), rank 1 gets 3 -> 4 / 3.5; modelled [5, 4] -> 5 / 4.5
    assert row["receiver_skew_from_others_measured"] == pytest.approx(8 / 7)
    assert row["receiver_skew_from_others_modelled"] == pytest.approx(10 / 9)


def test_recorded_matrix_columns_are_the_rank_loads():
    """The invariant the model rests on, in the real records: every assignment lands on the
    rank owning its expert, so matrix column sums are the contiguous per-rank loads."""
    for run in (MOCK, TEXT):
        for record in raw_records(run):
            for counts, matrix in zip(record["tokens_per_expert"], record["rank_matrix"]):
                half = len(counts) // 2
                assert np.asarray(matrix).sum(0).tolist() == [sum(counts[:half]), sum(counts[half:])]


# ---------------------------------------------------------------- bands


def test_bands_by_hand():
    assert bands.classify(2.5, 0.3) == "high"
    assert bands.classify(2.0, 0.25) == "high"  # at the threshold counts as high
    assert bands.classify(1.5, 0.1) == "low"
    assert bands.classify(2.5, 0.1) == "mixed"
    assert bands.classify(math.nan, 0.1) == "n/a"
    custom = bands.BandThresholds.parse("3,0.5")
    assert bands.classify(2.5, 0.3, custom) == "low"
    table = bands.band_table([1.0, 3.0, 2.5], [0.1, 0.5, 0.3])
    assert [row["band"] for row in table["layers"]] == ["low", "high", "high"]
    assert table["run"] == {"max_over_mean": 2.5, "gini": 0.3, "band": "high"}  # medians
    for bad in ("2", "x,0.3", "0.5,0.3", "2,1.5"):
        with pytest.raises(UsageError, match="thresholds"):
            bands.BandThresholds.parse(bad)


# ---------------------------------------------------------------- placement


def test_placement_by_hand():
    assert placement.contiguous_placement(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    loads = [8, 7, 6, 5, 4, 3, 2, 1]  # total 36: contiguous [26, 10] -> 26/18; {8,7,2,1} {6,5,4,3} -> 18/18
    assert placement.busiest_over_mean(placement.contiguous_placement(8, 2), loads) == pytest.approx(26 / 18)
    assert placement.busiest_over_mean(placement.balanced_placement(loads, 2), loads) == pytest.approx(1.0)
    # The hot expert alone is 10 of a mean of 9: 10/9 is the best any placement can do.
    assert placement.busiest_over_mean(placement.balanced_placement(SKEWED, 2), SKEWED) == pytest.approx(10 / 9)
    # Greedy alone gives {19,12,7}=38 / {18,16,2}=36; the swap search finds {19,16,2} / {18,12,7} = 37 / 37.
    loads = [19, 18, 16, 12, 7, 2]
    assert placement.busiest_over_mean(placement.balanced_placement(loads, 2), loads) == pytest.approx(1.0)


@pytest.mark.parametrize("num_experts,ep", [(8, 2), (16, 4), (32, 8), (64, 8), (32, 32), (12, 3)])
def test_balanced_placement_properties(num_experts, ep):
    rng = random.Random(num_experts * 100 + ep)
    for _ in range(5):
        loads = [int(rng.paretovariate(1.2) * 100) for _ in range(num_experts)]
        mapping = placement.balanced_placement(loads, ep)
        assert [len(rank) for rank in mapping] == [num_experts // ep] * ep
        assert sorted(e for rank in mapping for e in rank) == list(range(num_experts))
        value = placement.busiest_over_mean(mapping, loads)
        contiguous = placement.busiest_over_mean(placement.contiguous_placement(num_experts, ep), loads)
        assert value <= contiguous + 1e-12
        # No placement beats the busiest single expert or perfect balance.
        assert value >= max(1.0, max(loads) / (sum(loads) / ep)) - 1e-12


def test_replication_by_hand_and_conserves_tokens():
    loads = [12, 0, 0, 0, 2, 2, 2, 2]  # total 20, mean 10 per rank at EP=2
    mapping = placement.replicated_placement(loads, 2, 1)
    # expert 0 on both ranks (6 tokens each) + two 2s per rank -> [10, 10]
    assert all(0 in rank for rank in mapping)
    assert placement.rank_loads(mapping, loads) == pytest.approx([10, 10])
    assert all(len(rank) <= 4 + placement.extra_slots_per_rank(1, 2) for rank in mapping)
    assert placement.extra_slots_per_rank(1, 2) == 1 and placement.extra_slots_per_rank(3, 2) == 2
    # EP=3, expert 0 split 8 + 8 next to 16, 16, 11, 5, 4 (68 tokens, mean 68/3): the two 16s need
    # separate ranks, the third rank takes at most one copy of expert 0, so the other copy joins
    # a 16: 24 is a lower bound, and reachable ({16,8}, {16,8}, {11,5,4}) -> 24 / (68/3)
    loads = [16, 16, 16, 11, 5, 4]
    mapping = placement.replicated_placement(loads, 3, 1)
    assert placement.busiest_over_mean(mapping, loads) == pytest.approx(24 * 3 / 68)
    rng = random.Random(7)
    for ep, replicated in ((4, 4), (8, 3), (8, 8), (2, 16)):
        loads = [rng.randint(0, 1000) for _ in range(32)]
        mapping = placement.replicated_placement(loads, ep, replicated)
        assert sum(placement.rank_loads(mapping, loads)) == pytest.approx(sum(loads))
        copies = [sum(e in rank for rank in mapping) for e in range(32)]
        hottest = sorted(range(32), key=lambda e: -loads[e])[:replicated]
        assert all(copies[e] == (2 if e in hottest else 1) for e in range(32))
        assert all(len(set(rank)) == len(rank) <= 32 // ep + math.ceil(replicated / ep) for rank in mapping)
    with pytest.raises(UsageError, match="replicate 0 to 8"):
        placement.replicated_placement(SKEWED, 2, 9)
    with pytest.raises(UsageError, match="EP >= 2"):
        placement.replicated_placement(SKEWED, 1, 1)


def test_placement_fit_and_test_windows():
    fit = torch.tensor([[8, 7, 6, 5, 4, 3, 2, 1]])
    test = torch.tensor([[1, 1, 1, 1, 9, 1, 1, 1]])
    (row,) = placement.compare_placements(fit, test, 2, 1)
    for name in placement.STRATEGIES:
        mapping = row[name]["mapping"]
        # judged on the other window with the mapping fixed: rank sums by numpy, replicas halve
        copies = np.bincount([e for rank in mapping for e in rank], minlength=8)
        rank_tokens = [sum(test[0, e].item() / copies[e] for e in rank) for rank in mapping]
        assert row[name]["test"] == pytest.approx(max(rank_tokens) / (16 / 2))
    assert row["balanced"]["fit"] == pytest.approx(1.0)
    assert row["contiguous"]["test"] == pytest.approx(12 / 8)  # [1,1,1,1] and [9,1,1,1]
    (alone,) = placement.compare_placements(fit, None, 2, 0)
    assert alone["balanced"]["test"] is None


# ---------------------------------------------------------------- all-to-all cost


def test_all_to_all_time_by_hand():
    fabric = a2a_cost.Fabric(intra_node_gb_s=100, inter_node_gb_s=10, latency_us=5, gpus_per_node=2)
    # EP=4 over 2 nodes: ranks 0,1 on node 0, ranks 2,3 on node 1. GB from row to column.
    m = torch.tensor([[0, 1, 2, 0], [1, 0, 0, 0], [0, 0, 0, 1], [4, 0, 0, 0]], dtype=torch.float64) * 1e9
    # rank 0: in intra 1/100, out intra 1/100, in inter (0+4)/10 = 0.4, out inter 2/10
    # rank 3: out inter 4/10 = 0.4; ranks 1, 2 less -> 0.4 s + 5 us
    assert float(a2a_cost.all_to_all_seconds(m, fabric)) == pytest.approx(0.4 + 5e-6)
    # combine is the dispatch reversed: the same time
    assert float(a2a_cost.all_to_all_seconds(m.T, fabric)) == pytest.approx(0.4 + 5e-6)


def test_dispatch_cost_by_hand():
    one_node = a2a_cost.Fabric(intra_node_gb_s=100, inter_node_gb_s=10, latency_us=0, gpus_per_node=2)
    # 1000 assignments x 1000 bytes per rank, EP=2 -> 2e6 bytes; shape [[1,3],[1,3]] -> 250 kB a unit:
    # [[250k, 750k], [250k, 750k]]. Rank 0 sends 750k, rank 1 receives 750k: 750e3 / 100e9 = 7.5 us.
    # Balanced: 500 kB each way -> 5 us.
    (row,) = a2a_cost.dispatch_cost(torch.tensor([[[1, 3], [1, 3]]]), 1000, 1000, one_node)
    assert row["skewed_us"] == pytest.approx(7.5)
    assert row["balanced_us"] == pytest.approx(5.0)
    assert row["penalty"] == pytest.approx(1.5)
    assert row["max_bytes_received"] == pytest.approx(750e3)
    assert row["balanced_bytes_received"] == pytest.approx(500e3)
    with_latency = a2a_cost.Fabric(100, 10, 10, 2)
    (row,) = a2a_cost.dispatch_cost(torch.tensor([[[1, 3], [1, 3]]]), 1000, 1000, with_latency)
    assert row["penalty"] == pytest.approx(17.5 / 15)


def test_fabric_validation():
    for kwargs, match in (({"intra_node_gb_s": 0}, "bandwidths must be positive"),
                          ({"inter_node_gb_s": -1}, "bandwidths must be positive"),
                          ({"latency_us": -1}, "latency"), ({"gpus_per_node": 0}, "gpus per node")):
        with pytest.raises(UsageError, match=match):
            a2a_cost.Fabric(**kwargs)


def test_worst_device_skew_by_hand():
    # E=8, K=2, EP=2, f=2, W=1: mean expert load 1, hot 2, the other 7 share 6 -> 6/7 each;
    # worst device: hot + 3 others = 2 + 18/7 = 32/7, mean device 4 -> 8/7
    assert a2a_cost.worst_device_skew(8, 2, 2, 2.0, 1) == pytest.approx(8 / 7)
    # f = -1 is E/K = 4: others share 4 -> 4/7 each; 4 + 12/7 = 40/7 over 4 -> 10/7
    assert a2a_cost.worst_device_skew(8, 2, 2, -1, 1) == pytest.approx(10 / 7)
    # EP=3 does not divide 8: worst device holds ceil(8/3) = 3 experts: 2 + 2*6/7 = 26/7, mean 8/3 -> 39/28
    assert a2a_cost.worst_device_skew(8, 2, 3, 2.0, 1) == pytest.approx(39 / 28)
    assert a2a_cost.worst_device_skew(8, 2, 2, 1.0, 1) == pytest.approx(1.0)  # f=1 is balance
    # W=K hot experts at E/K take every token; both on one device of EP=2 -> all traffic there: EP
    assert a2a_cost.worst_device_skew(8, 2, 2, -1, 2) == pytest.approx(2.0)
    for args, match in (((0, 2, 2), "experts must be a positive"), ((8, 0, 2), "top-k must be"),
                        ((8, 2, 0), "EP must be"), ((8, 2, 9), r"EP \(9\) cannot exceed"),
                        ((8, 9, 2), r"top-k \(9\) cannot exceed"), ((8, 2, 2, 0.5), "imbalance factor"),
                        ((8, 2, 2, 5.0), "imbalance factor"), ((8, 2, 2, 4.0, 3), "W\\*f <= E"),
                        ((8, 2, 2, 1.0, 9), "hot experts")):
        with pytest.raises(UsageError, match=match):
            a2a_cost.worst_device_skew(*args)


# ---------------------------------------------------------------- reading runs, two runs compared


def test_settings_from_meta(tmp_path):
    counts = [[SKEWED]]
    megatron = load_window(write_run(tmp_path / "a", counts, meta={
        "args": {"hidden_size": 512, "bf16": True, "micro_batch_size": 2},
        "command": ["x", "--hidden-size", "99", "--seq-length", "128", "--seq-length=256"]}))
    assert megatron.setting("hidden_size") == (512, "meta args.hidden_size")  # args before the command
    assert megatron.setting("seq_length") == (256, "meta command --seq-length")  # the last flag wins
    assert megatron.setting("bytes_per_element") == (2, "meta args bf16/fp16")
    assert megatron.setting("topk") == (2, "run records")
    demo = load_window(write_run(tmp_path / "b", counts, meta={"model": {"hidden_size": 64, "tp": 1}}))
    assert demo.setting("hidden_size") == (64, "meta model.hidden_size")
    assert demo.setting("bytes_per_element")[0] == 4  # a known configuration without bf16/fp16 is fp32
    assert demo.setting("context_parallel") is None
    bare = load_window(write_run(tmp_path / "c", counts))
    assert bare.setting("bytes_per_element") is None
    nothing_given = AnalysisOptions(hidden_size=None, bytes_per_element=None, tokens_per_rank=None,
                                    gpus_per_node=None)
    assert run_analysis.cost_settings(bare, nothing_given)["missing"] == ["hidden_size", "tokens_per_rank"]
    parallel = load_window(write_run(tmp_path / "d", counts, meta={"args": {
        "micro_batch_size": 2, "seq_length": 64, "tensor_model_parallel_size": 2, "context_parallel_size": 4}}))
    # each rank of a TP x CP group dispatches its share of the micro-batch: 2 * 64 / (2 * 4)
    assert run_analysis.cost_settings(parallel, nothing_given)["tokens_per_rank"]["value"] == 16
    assert parse_steps("10:") == (10, None) and parse_steps(":30") == (None, 30)
    with pytest.raises(UsageError, match="START:END"):
        parse_steps("10")


def test_load_window_errors(tmp_path):
    with pytest.raises(UsageError, match="not a run folder"):
        load_window(tmp_path / "nope")
    empty = write_run(tmp_path / "empty", [])
    with pytest.raises(UsageError, match="no probe reports"):
        load_window(empty)
    run = write_run(tmp_path / "run", [[SKEWED], [SKEWED]])
    assert load_window(run, "15:").describe_steps() == "iterations 11-20 (1 interval)"
    with pytest.raises(UsageError, match="no interval closes"):
        load_window(run, "100:200")
    with pytest.raises(UsageError, match="no layer 3"):
        load_window(run, layers=[3])
    writer = LocalWriter(run)  # a restart at another EP
    writer.write(IntervalReport(30, 10, 0.0, [1], 8, 4, [{}], [SKEWED], [[[0] * 4] * 4]))
    writer.close()
    with pytest.raises(UsageError, match="changes experts, EP or layers at iteration 30"):
        load_window(run)


def test_two_runs_by_hand(tmp_path):
    # A: [4,0,0,0] Gini (n-1)/n = 0.75, max/mean 4, entropy 0.
    # B: [2,2,0,0] Gini sum((2i-5) x_(i)) / (4*4) = (1*2 + 3*2) / 16 = 0.5, max/mean 2, entropy ln2/ln4 = 0.5
    # Per-iteration Gini of A: 0.2 over 10 iterations and 0.6 over 30 -> (2 + 18) / 40 = 0.5; B: 0.25.
    a = write_run(tmp_path / "a", [[[4, 0, 0, 0]], [[0, 0, 0, 0]]], steps=[10, 30],
                  per_layer=[[{"gini_step_mean": 0.2}], [{"gini_step_mean": 0.6}]])
    b = write_run(tmp_path / "b", [[[2, 2, 0, 0]]], per_layer=[[{"gini_step_mean": 0.25}]])
    result = compare_runs(load_window(a), load_window(b))
    (row,) = result["layers"]
    assert row["gini"]["window"] == pytest.approx({"run": 0.75, "against": 0.5, "ratio": 1.5})
    assert row["max_over_mean"]["window"] == pytest.approx({"run": 4.0, "against": 2.0, "ratio": 2.0})
    assert row["entropy"]["window"] == pytest.approx({"run": 0.0, "against": 0.5, "ratio": 0.0})
    assert row["gini"]["step"] == pytest.approx({"run": 0.5, "against": 0.25, "ratio": 2.0})
    assert math.isnan(row["max_over_mean"]["step"]["run"])  # not recorded
    assert result["median_ratio"]["gini"] == pytest.approx({"step": 2.0, "window": 1.5})
    unrecorded = write_run(tmp_path / "e", [[[1, 1, 1, 1]]])
    assert compare_runs(load_window(a), load_window(unrecorded))["basis"] == "window"
    other = write_run(tmp_path / "c", [[[1] * 8]])
    with pytest.raises(UsageError, match="compare runs of one model"):
        compare_runs(load_window(a), load_window(other))
    with pytest.raises(UsageError, match="share no MoE layer"):
        compare_runs(load_window(a), load_window(write_run(tmp_path / "d", [[[1] * 4]], layers=(2,))))


# ---------------------------------------------------------------- the command, end to end


def test_cli_json_on_the_h200_run(capsys):
    code, out, _ = analyze(capsys, MOCK, "--json", "--against", TEXT, "--target-ep", 8, "--gpus-per-node", 8)
    assert code == 0
    result = json.loads(out)
    records = raw_records(MOCK)
    counts = np.sum([r["tokens_per_expert"] for r in records], axis=0)  # [layer, expert]
    assert result["run"]["ep_size"] == 2 and result["run"]["layers"] == [1, 2, 3, 4]
    assert [s["ep"] for s in result["ep_whatif"]["by_ep"]] == [2, 4, 8, 16, 32]
    ep4 = next(s for s in result["ep_whatif"]["by_ep"] if s["ep"] == 4)
    rank_loads = counts.reshape(4, 4, 8).sum(-1)  # contiguous: rank r holds experts 8r..8r+7
    assert ep4["window"] == pytest.approx((rank_loads.max(1) / rank_loads.mean(1)).tolist())
    matrix = np.sum([r["rank_matrix"] for r in records], axis=0)
    local = [np.trace(m) / m.sum() for m in matrix]
    assert [row["local_fraction_measured"] for row in result["matrix_check"]["layers"]] == pytest.approx(local)
    # bands are on the recorded per-iteration values, weighted by iterations
    gini_step = [sum(r["steps"] * r["per_layer"][i]["gini_step_mean"] for r in records) / 30 for i in range(4)]
    assert result["bands"]["basis"] == "step"
    assert [row["gini"] for row in result["bands"]["layers"]] == pytest.approx(gini_step)
    place = result["placement"]
    assert place["ep"] == 8 and place["replicated"] == 8 and place["extra_slots_per_rank"] == 1
    for row in place["layers"]:
        assert row["balanced"]["fit"] <= row["contiguous"]["fit"]
    cost = result["cost"]
    assert cost["settings"]["hidden_size"]["value"] == 1024 and cost["settings"]["tokens_per_rank"]["value"] == 8192
    assert cost["settings"]["bytes_per_element"]["value"] == 2 and cost["fabric"]["gpus_per_node"] == 8
    ep2 = [e for e in cost["by_ep"] if e["ep"] == 2]
    assert [e["source"] for e in ep2] == ["measured", "modelled"]
    # balanced EP=2: 8192 tokens x top-4 x 1024 x 2 bytes per rank, half of it to the other rank
    balanced_bytes = 8192 * 4 * 1024 * 2 / 2
    assert ep2[0]["layers"][0]["balanced_us"] == pytest.approx(10 + balanced_bytes / 450e9 * 1e6)
    assert [e["nodes"] for e in cost["by_ep"] if e["source"] == "modelled"] == [1, 1, 1, 2, 4]
    against = result["against"]
    text_gini = [sum(r["steps"] * r["per_layer"][i]["gini_step_mean"] for r in raw_records(TEXT)) / 30
                 for i in range(4)]
    assert [row["gini"]["step"]["ratio"] for row in against["layers"]] == pytest.approx(
        [g / t for g, t in zip(gini_step, text_gini)])


def test_cli_tables_and_plot(capsys, tmp_path):
    plot = tmp_path / "analysis.png"
    code, out, _ = analyze(capsys, MOCK, "--against", TEXT, "--plot", plot, "--mapping", "--steps", ":20")
    assert code == 0
    for title in ("EP what-if", "measured vs modelled", "Imbalance bands", "Expert placement at EP=2",
                  "All-to-all dispatch", "Two runs compared", "layer 1 balanced:"):
        assert title in out, title
    assert "iterations 1-20 (2 intervals)" in out
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/nope"], "not a run folder"),
    (["{empty}"], "no probe reports"),
    (["{mock}", "--ep", "3"], "EP=3 does not divide 32"),
    (["{mock}", "--target-ep", "0"], "EP must be a positive integer"),
    (["{mock}", "--intra-node-gbs", "0"], "bandwidths must be positive"),
    (["{mock}", "--hidden-size", "0"], "--hidden-size must be positive"),
    (["{mock}", "--steps", "100:"], "no interval closes"),
    (["{mock}", "--layers", "7"], "no layer 7"),
    (["{mock}", "--replicate", "40"], "replicate 0 to 32"),
    (["{mock}", "--band-thresholds", "2"], "MAX_OVER_MEAN,GINI"),
])
def test_cli_errors_exit_2(capsys, tmp_path, argv, message):
    empty = write_run(tmp_path / "empty", [])
    code, _, err = analyze(capsys, *[a.format(tmp=tmp_path, empty=empty, mock=MOCK) for a in argv])
    assert code == 2
    assert message in err


def test_cli_malformed_list_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["analyze", str(MOCK), "--ep", "2,x"])
    assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert cli.main(["demo", "--out", str(out), "--quiet", "--steps", "20"]) == 0
    return out


def test_cli_on_a_fresh_demo_run(capsys, demo_run):
    code, out, _ = analyze(capsys, demo_run, "--json")
    assert code == 0
    result = json.loads(out)
    assert [s["ep"] for s in result["ep_whatif"]["by_ep"]] == [2, 4, 8]
    settings = result["cost"]["settings"]
    # The demo's model: hidden 64, fp32 on CPU, micro-batch 4 x 64 tokens
    assert (settings["hidden_size"]["value"], settings["bytes_per_element"]["value"],
            settings["tokens_per_rank"]["value"]) == (64, 4, 256)
    code, _, err = analyze(capsys, demo_run, "--against", MOCK)
    assert code == 2 and "compare runs of one model" in err
