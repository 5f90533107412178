"""`moe-probe compare` on two real probe runs from 2xH200 (tests/data/h200_*: the local store
and Megatron's log lines of a mock-data and a real-text run of the tiny-gpu recipe)."""

import json
import math
import statistics

from helpers import H200_RUNS, assert_one_line_error, cli
from megatron_moe_probe.offline.compare import compare
from megatron_moe_probe.offline.train_log import read_train_log

RUNS = list(H200_RUNS)


def _log_numbers(path):
    """Independent reading of Megatron's lines: split on '|' and ':' by hand."""
    times, losses, mem = {}, {}, []
    for line in path.read_text().splitlines():
        if "max allocated:" in line:
            mem.append(float(line.split("max allocated:")[1].split("|")[0]))
        elif "iteration" in line and "elapsed time per iteration" in line:
            it = int(line.split("iteration")[1].split("/")[0])
            cells = {c.split(":")[0].strip(): c.split(":")[1].strip() for c in line.split("|")[1:] if ":" in c}
            times[it] = float(cells["elapsed time per iteration (ms)"])
            losses[it] = float(cells["lm loss"])
    return times, losses, max(mem)


def test_train_log_parser_reads_megatrons_lines():
    log = read_train_log(RUNS[0] / "megatron.log")
    times, losses, mem = _log_numbers(RUNS[0] / "megatron.log")
    assert log.iterations == sorted(times)
    assert dict(log.series("elapsed time per iteration (ms)")) == times
    assert dict(log.series("lm loss")) == losses
    assert log.max_allocated_mb[0] == mem


def test_compare_two_h200_runs():
    rows = compare(RUNS, {}, warmup=10)
    for run, row in zip(RUNS, rows):
        times, losses, mem = _log_numbers(run / "megatron.log")
        assert row["ms_per_iter"] == statistics.median(v for it, v in times.items() if it > 10)
        assert row["final_lm_loss"] == losses[max(losses)]
        assert row["max_allocated_mb"] == mem
        reports = [json.loads(line) for line in (run / "intervals.jsonl").read_text().splitlines()]
        kept = [r for r in reports if r["step"] > 10]
        per_layer = [statistics.median(r["per_layer"][i]["max_over_mean"] for r in kept)
                     for i in range(len(kept[0]["layers"]))]
        assert row["max_over_mean_per_layer"] == per_layer
        assert row["max_over_mean"] == statistics.median(per_layer)
        assert row["ep"] == 2 and row["intervals"] == len(kept)
    # Mock data and real text: their losses do not compare, so there is no delta.
    assert [row["data"] for row in rows] == ["mock", "textds"]
    assert all(math.isnan(row["loss_delta_vs_first"]) for row in rows)
    same = compare(RUNS, {}, warmup=10, parity_groups=["a", "a"])  # as if on one data set
    assert same[0]["loss_delta_vs_first"] == 0
    assert same[1]["loss_delta_vs_first"] == same[1]["final_lm_loss"] - same[0]["final_lm_loss"]


def test_compare_cli_table_plot_and_bad_input(tmp_path):
    plot = tmp_path / "cmp.png"
    proc = cli("compare", *RUNS, "--plot", plot)
    assert proc.returncode == 0, proc.stderr
    assert "h200_run_mock" in proc.stdout and "h200_run_text" in proc.stdout
    assert plot.stat().st_size > 1000
    assert_one_line_error(cli("compare", tmp_path / "nope"), "not a run folder")
