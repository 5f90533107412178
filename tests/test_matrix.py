"""`moe-probe matrix`: a real CPU grid (demo cells), resume, a failing cell, usage errors."""

import json
import statistics
import subprocess

import numpy
import pytest
import torch

from helpers import cli, cli_popen
from megatron_moe_probe.offline.matrix import repeat_spread


def _matrix(*argv, timeout=900):
    return cli("matrix", *argv, timeout=timeout)


@pytest.fixture(scope="module")
def demo_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    proc = _matrix("--demo", "--ep", "2", "--dispatcher", "alltoall,allgather", "--data", "text",
                   "--iters", "6", "--out", str(out))
    return out, proc


def test_demo_grid_trains_every_cell_and_compares_them(demo_grid):
    out, proc = demo_grid
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "matrix.json").read_text())
    assert [(c["name"], c["status"]) for c in manifest["cells"]] == [
        ("ep2-alltoall-text", "ok"), ("ep2-allgather-text", "ok")]
    rows = {r["cell"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    for name, row in rows.items():
        # ms/iter is the median of the demo's own per-iteration times after the warm-up (6 // 4 = 1).
        lines = [json.loads(x) for x in (out / name / "train.jsonl").read_text().splitlines()]
        assert [x["iteration"] for x in lines] == list(range(1, 7))
        after = [x["elapsed time per iteration (ms)"] for x in lines if x["iteration"] > 1]
        assert row["ms_per_iter"] == pytest.approx(statistics.median(after))
        assert row["final_lm_loss"] == pytest.approx(lines[-1]["lm loss"])
        assert row["ep"] == 2 and row["dispatcher"] == name.split("-")[1]
    assert (out / "compare.png").stat().st_size > 1000 and (out / "layers.png").stat().st_size > 1000


def test_alltoall_and_allgather_route_and_train_alike(demo_grid):
    """Same seed, data and model: the dispatcher moves tokens differently but must not change
    what is computed. The first interval's routing (before any update can diverge) is equal."""
    out, _ = demo_grid
    first = {}
    for name in ("ep2-alltoall-text", "ep2-allgather-text"):
        first[name] = json.loads((out / name / "intervals.jsonl").read_text().splitlines()[0])
    a, b = first.values()
    assert a["tokens_per_expert"] == b["tokens_per_expert"]
    loss = {n: [json.loads(x)["lm loss"] for x in (out / n / "train.jsonl").read_text().splitlines()]
            for n in first}
    assert loss["ep2-allgather-text"] == pytest.approx(loss["ep2-alltoall-text"], rel=1e-4)


def test_finished_cells_are_not_trained_again(demo_grid):
    out, _ = demo_grid
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/intervals.jsonl")}
    proc = _matrix("--demo", "--ep", "2", "--dispatcher", "alltoall,allgather", "--data", "text",
                   "--iters", "6", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 of 2 cells already finished" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/intervals.jsonl")} == before


def test_a_failing_cell_is_reported_with_its_log_and_exit_code_1(tmp_path):
    # `moe-probe train` needs CUDA; on this CPU machine the cell fails, and says why.
    proc = _matrix("tiny-gpu", "--iters", "2", "--out", str(tmp_path))
    assert proc.returncode == 1
    cell = json.loads((tmp_path / "matrix.json").read_text())["cells"][0]
    assert cell["status"] == "failed" and cell["exit_code"] == 2
    assert "needs CUDA" in (tmp_path / cell["name"] / "megatron.log").read_text()
    assert "tiny-gpu failed" in proc.stdout and "needs CUDA" in proc.stdout


def test_recipe_cells_interleave_repeats_and_pass_datasets(tmp_path):
    prefix = tmp_path / "text"
    (tmp_path / "text.bin").write_bytes(b"")
    (tmp_path / "text.idx").write_bytes(b"")
    proc = _matrix("tiny-gpu", "tiny-gpu:allgather", "--data", f"recipe,{prefix}", "--repeat", "2",
                   "--iters", "5", "--out", str(tmp_path / "m"), "--dry-run", "--", "--log-interval", "5")
    assert proc.returncode == 0, proc.stderr
    names = [line[2:] for line in proc.stdout.splitlines() if line.startswith("# ")]
    assert names == ["tiny-gpu-r1", "tiny-gpu-text-r1", "tiny-gpu-allgather-r1", "tiny-gpu-allgather-text-r1",
                     "tiny-gpu-r2", "tiny-gpu-text-r2", "tiny-gpu-allgather-r2", "tiny-gpu-allgather-text-r2"]
    commands = [line for line in proc.stdout.splitlines() if not line.startswith("#")]  # "## " lines: validation notes
    assert all(("--data-path " + str(prefix) in c) == ("-text-" in c) for c in commands)
    assert all(c.split(" > ")[0].endswith("--log-interval 5") and "--train-iters 5" in c for c in commands)


@pytest.mark.parametrize("argv, message", [
    (["--demo", "--ep", "3"], "EP 2, 4 or 8"),
    (["--demo", "--data", "wiki"], "--demo data is one of"),
    (["--demo", "--dispatcher", "flex"], "alltoall and allgather"),
    (["tiny-gpu", "--demo"], "not both"),
    (["tiny-gpu", "--data", "/no/such/prefix"], "no /no/such/prefix.bin"),
    (["tiny-gpu:nope"], "unknown variant"),
    (["--demo", "--ep", "2,8", "--global-batch", "12"], "multiple of every EP"),
    (["tiny-gpu", "--global-batch", "8"], "for --demo cells"),
    ([], "name recipes"),
])
def test_bad_grids_are_clear_errors(tmp_path, argv, message):
    proc = _matrix(*argv, "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "m").exists()


def test_repeat_spread_by_hand():
    rows = [{"group": "a", "ms_per_iter": 100.0}, {"group": "b", "ms_per_iter": 50.0},
            {"group": "a", "ms_per_iter": 110.0}, {"group": "a", "ms_per_iter": 90.0}]
    # group a: median 100, (110 - 90) / 100 = 0.2; group b has one run: no spread.
    assert repeat_spread(rows) == [{"group": "a", "runs": 3, "median_ms_per_iter": 100.0, "spread": 0.2}]


def test_demo_mock_data_is_megatrons_mock_stream():
    from megatron_moe_probe.cpu.demo import training_tokens

    tokens = training_tokens("mock", 256)
    # MockGPTLowLevelDataset: document i has length L_i (seeded numpy draw), tokens 1..L_i-1 then EOD.
    lengths = numpy.random.default_rng(seed=0).integers(low=1, high=4096, size=100000, dtype=numpy.int32)
    first = [(k + 1) % 256 for k in range(lengths[0] - 1)] + [255]
    assert tokens[: len(first)].tolist() == first
    assert tokens.numel() == training_tokens("text", 256).numel()
    rand = training_tokens("random", 256)
    assert rand.min() >= 0 and rand.max() < 256 and torch.unique(rand).numel() == 256


def test_same_global_batch_gives_the_same_first_layer_routing_at_every_ep(tmp_path):
    """With --global-batch fixed, EP=2 and EP=4 train on the same tokens. The first MoE layer's
    router and everything before it start from the same weights whatever the EP, so its step-1
    counts (summed by the probe over 2 or 4 ranks) must be equal; deeper layers see the outputs
    of experts that Megatron initialises per EP rank, so they may differ."""
    proc = _matrix("--demo", "--ep", "2,4", "--dispatcher", "alltoall", "--global-batch", "8", "--iters", "1",
                   "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    first = {ep: json.loads((tmp_path / f"ep{ep}-alltoall-text" / "intervals.jsonl").read_text().splitlines()[0])
             for ep in (2, 4)}
    assert first[2]["layers"][0] == first[4]["layers"][0] == 1
    assert first[2]["tokens_per_expert"][0] == first[4]["tokens_per_expert"][0]
    assert sum(first[2]["tokens_per_expert"][0]) == 8 * 64 * 2  # 8 sequences x 64 tokens x top-2
    assert [len(m) for m in (first[2]["rank_matrix"][0], first[4]["rank_matrix"][0])] == [2, 4]


def test_cell_timeout_stops_the_whole_cell(tmp_path):
    """A hung cell is stopped with every process it started (the demo spawns one per rank)."""
    proc = _matrix("--demo", "--ep", "2", "--dispatcher", "alltoall", "--iters", "1000", "--cell-timeout", "6",
                   "--out", str(tmp_path))
    assert proc.returncode == 1
    cell = json.loads((tmp_path / "matrix.json").read_text())["cells"][0]
    assert cell["status"] == "failed" and "--cell-timeout 6" in cell["extra"]["reason"]
    assert 6 <= cell["seconds"] < 60
    # The cell ran in its own session (the demo and one spawned process per rank): all gone.
    leftover = subprocess.run(["pgrep", "-s", str(cell["extra"]["pid"])], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes of the stopped cell still running: {leftover}"


def test_sigterm_to_the_matrix_stops_the_running_cell_and_records_it(tmp_path):
    """A scheduler killing the matrix must not leave the cell's trainers running unseen."""
    import signal
    import time

    proc = cli_popen("matrix", "--demo", "--ep", "2", "--dispatcher", "alltoall", "--iters", "1000",
                     "--out", tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    manifest = tmp_path / "matrix.json"
    deadline = time.monotonic() + 60
    cell = {}
    while time.monotonic() < deadline and cell.get("status") != "running":
        time.sleep(0.2)
        if manifest.is_file():
            cell = json.loads(manifest.read_text())["cells"][0]
    assert cell.get("status") == "running", "the manifest never showed the cell running"
    time.sleep(3)  # let the demo spawn its ranks
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    cell = json.loads(manifest.read_text())["cells"][0]
    assert cell["status"] == "interrupted" and "run the same command again" in out
    leftover = subprocess.run(["pgrep", "-s", str(cell["extra"]["pid"])], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes of the stopped cell still running: {leftover}"
