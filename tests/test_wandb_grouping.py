"""wandb comparisons that group themselves: a real `moe-probe matrix --demo --wandb` grid, its
offline wandb runs read back from their `.wandb` files (group, grouping keys, summary table),
and `compare` reading the same keys back."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from megatron_moe_probe.offline.compare import compare
from megatron_moe_probe.grouping import KEYS, SUMMARY_STATS
from megatron_moe_probe.offline.wandb_source import read_offline
from megatron_moe_probe.record import load_run
from megatron_moe_probe.writers.wandb import SUMMARY_TABLE
from test_writers import finished_wandb_records

CELLS = ["ep2-alltoall-text", "ep2-allgather-text"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    pytest.importorskip("wandb")
    out = tmp_path_factory.mktemp("wgrid") / "dispatch-sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
           "WANDB_CONFIG_DIR": str(out.parent / "wcfg"), "WANDB_CACHE_DIR": str(out.parent / "wcache")}
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_probe.cli", "matrix", "--demo", "--ep", "2",
                           "--dispatcher", "alltoall,allgather", "--iters", "4", "--wandb", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _wandb_dir(cell_dir):
    (run_dir,) = (cell_dir / "wandb").glob("offline-run-*")
    return run_dir


def test_matrix_cells_land_in_one_wandb_group_with_their_keys(grid):
    for name in CELLS:
        run_dir = _wandb_dir(grid / name)
        records = finished_wandb_records(next(run_dir.glob("run-*.wandb")))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.run_group == "dispatch-sweep" and run.display_name == name
        config, rows = read_offline(run_dir)
        keys = config["moe_probe"]["group"]
        assert set(keys) == set(KEYS)
        assert keys["group"] == "dispatch-sweep" and keys["ep"] == 2 and keys["data"] == "text"
        assert keys["dispatcher"] == name.split("-")[1] and keys["hardware"] == "cpu"
        # The end of the run: one per-layer summary table, medians of the reports' statistics.
        (table,) = [row for row in rows if row.get(f"{SUMMARY_TABLE}/_type") == "table-file"]
        assert table[f"{SUMMARY_TABLE}/nrows"] == 2 and table[f"{SUMMARY_TABLE}/ncols"] == 1 + len(SUMMARY_STATS)
        (path,) = run_dir.glob("files/media/table/moe_summary/layers_*.table.json")
        data = json.loads(path.read_text())
        assert data["columns"] == ["layer", *SUMMARY_STATS]
        _, reports = load_run(grid / name)
        for row in data["data"]:
            i = reports[0].layers.index(row[0])
            for column, value in zip(data["columns"][1:], row[1:]):
                if column in ("tokens", "max_over_mean", "gini"):
                    assert value == pytest.approx(statistics.median(r.per_layer[i][column] for r in reports))


def test_compare_reads_the_grouping_keys_back(grid):
    runs = [_wandb_dir(grid / name) for name in CELLS] + [grid / CELLS[0]]
    rows = compare(runs, {}, warmup=0)
    for row, name in zip(rows, CELLS + CELLS[:1]):
        assert row["group"] == "dispatch-sweep" and row["dispatcher"] == name.split("-")[1]
        assert row["ep"] == 2 and row["hardware"] == "cpu" and row["data"] == "text"
    # The local run folder and its wandb twin say the same.
    assert {k: rows[0][k] for k in KEYS} == {k: rows[2][k] for k in KEYS}
