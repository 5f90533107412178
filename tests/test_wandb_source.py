"""`moe-probe compare` on wandb runs: real offline runs written by the probe's WandbWriter (and
Megatron-style keys logged next to them), read back from the `.wandb` file; the wandb API path
against a closed port. Expected rows are computed here from the values logged."""

from __future__ import annotations

import json
import math
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_writers import finished_wandb_records

from megatron_moe_probe.offline.compare import compare
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record import IntervalReport
from megatron_moe_probe.writers.base import make_writers

ROW_STATS = ("max_over_mean", "max_over_mean_step_worst", "gini", "rank_max_over_mean", "receiver_skew",
             "inter_node_fraction", "dispatch_fwd_ms", "combine_fwd_ms", "dispatch_bwd_ms", "combine_bwd_ms")
MEGATRON_LOG = Path(__file__).parent / "data" / "h200_run_mock" / "megatron.log"


def report(step: int, layers, ep: int = 2, experts: int = 8) -> IntervalReport:
    rng = random.Random(step)
    tokens = [[rng.randint(1, 400) for _ in range(experts)] for _ in layers]
    per_layer = []
    for n, counts in zip(layers, tokens):
        row = {"max_over_mean": max(counts) * experts / sum(counts), "gini": rng.uniform(0.05, 0.6),
               "max_over_mean_step_worst": rng.uniform(1.5, 4.0), "rank_max_over_mean": rng.uniform(1.0, 2.0),
               "receiver_skew": math.nan if n == layers[0] else rng.uniform(1.0, 1.8),  # never defined on one layer
               "dispatch_fwd_ms": rng.uniform(0.1, 2.0)}
        if step % 20:  # the combine timer misses some intervals
            row["combine_fwd_ms"] = rng.uniform(0.1, 2.0)
        per_layer.append(row)
    return IntervalReport(step=step, steps=5, time=1.7e9 + step, layers=list(layers), num_experts=experts, ep_size=ep,
                          per_layer=per_layer, tokens_per_expert=tokens,
                          rank_matrix=[[[rng.randint(0, 99)] * ep for _ in range(ep)] for _ in layers])


def expected_stats(reports: list[IntervalReport], warmup: int) -> dict:
    """Median over layers of each layer's median over the intervals after warm-up, NaN skipped."""
    kept = [r for r in reports if r.step > warmup]

    def median(values):
        values = [v for v in values if not math.isnan(v)]
        return statistics.median(values) if values else math.nan

    out = {"intervals": len(kept), "layers": kept[0].layers}
    for stat in ROW_STATS:
        by_layer = [median([r.per_layer[i].get(stat, math.nan) for r in kept]) for i in range(len(kept[0].layers))]
        out[stat] = median(by_layer)
        if stat == "max_over_mean":
            out["max_over_mean_per_layer"] = by_layer
    return out


def same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def offline_run_dir(out: Path) -> Path:
    """The finished offline run under `out` (wandb's service may still be writing it after finish())."""
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    finished_wandb_records(next(run_dir.glob("run-*.wandb")))
    return run_dir


def test_megatron_style_wandb_run(tmp_path, wandb_offline):
    # As Megatron does with --wandb-project: wandb.init with its args as config, on the last rank.
    (tmp_path / "megatron").mkdir()
    run = wandb_offline.init(project="megatron", dir=str(tmp_path / "megatron"), mode="offline",
                             config={"moe_token_dispatcher_type": "alltoall", "expert_model_parallel_size": 4})
    writers = make_writers(["wandb"], tmp_path / "probe", {"probe": {"interval": 5}}, heatmap_every=2)
    layers = list(range(1, 101))  # a history record longer than a 32 KiB block; layer_100 has 3 digits
    reports, megatron = [], {}
    for it in range(1, 31):
        if it % 5 == 0:
            reports.append(report(it, layers, ep=4))
            writers.write(reports[-1])
        megatron[it] = {"iteration-time": 0.2 + 0.01 * ((7 * it) % 11), "throughput": 30.0 + (it % 7),
                        "lm loss": 9.0 - 0.1 * it}
        run.log({**megatron[it], "moe/load_balancing_loss_layer_0": 1.5}, step=it)  # Megatron's own MoE key too
    writers.close()
    run.finish()
    assert len(json.dumps(reports[0].scalars())) > 32768

    (row,) = compare([offline_run_dir(tmp_path / "megatron")], {}, warmup=10)
    for key, value in expected_stats(reports, warmup=10).items():
        assert same(row[key], value), key
    after = [m for it, m in megatron.items() if it > 10]
    assert row["ms_per_iter"] == pytest.approx(statistics.median(1000 * m["iteration-time"] for m in after))
    assert row["tflops_per_gpu"] == statistics.median(m["throughput"] for m in after)
    assert (row["final_iteration"], row["final_lm_loss"]) == (30, megatron[30]["lm loss"])
    assert math.isnan(row["max_allocated_mb"])  # Megatron logs memory to TensorBoard only
    assert (row["dispatcher"], row["ep"]) == ("alltoall", 4)


def test_local_and_wandb_rows_of_the_same_reports_agree(tmp_path, wandb_offline):
    out = tmp_path / "probe"
    meta = {"dispatcher": "flex", "data": "text", "args": {"expert_model_parallel_size": 2}}
    writers = make_writers(["local", "wandb"], out, meta, heatmap_every=3)
    reports = [report(step, [2, 4, 6]) for step in range(4, 44, 4)]
    with open(out / "train.jsonl", "w") as train:  # Megatron's numbers for the local run, as `moe-probe demo` writes
        for r in reports:
            writers.write(r)
            numbers = {"iteration-time": r.step / 1000, "throughput": 40.0 - r.step / 8, "lm loss": 8.0 / r.step}
            wandb_offline.run.log(numbers, step=r.step)
            ms = numbers["iteration-time"] * 1000  # Megatron's stdout says ms, its wandb key seconds
            train.write(json.dumps({"iteration": r.step, "elapsed time per iteration (ms)": ms,
                                    "throughput per GPU (TFLOP/s/GPU)": numbers["throughput"],
                                    "lm loss": numbers["lm loss"]}) + "\n")
    writers.close()
    wandb_dir = offline_run_dir(out)

    local_row, wandb_row = compare([out, wandb_dir], {}, warmup=10)
    assert local_row.keys() == wandb_row.keys()
    for key in local_row.keys() - {"run", "loss_delta_vs_first"}:
        assert same(local_row[key], wandb_row[key]), key
    assert wandb_row["loss_delta_vs_first"] == 0 and wandb_row["dispatcher"] == "flex" and wandb_row["ep"] == 2
    for key, value in expected_stats(reports, warmup=10).items():
        assert same(wandb_row[key], value), key

    # The CLI: a local and a wandb run in one table; --log works for a wandb run as for a local one.
    cli = [sys.executable, "-m", "megatron_moe_probe.cli", "compare", str(out), str(wandb_dir)]
    table = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert out.name in table.stdout and wandb_dir.name in table.stdout
    logs = [f"--log={out}={MEGATRON_LOG}", f"--log={wandb_dir}={MEGATRON_LOG}"]
    as_json = subprocess.run([*cli, *logs, "--json"], capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout.replace("NaN", "null"))
    peak = max(float(line.split("max allocated:")[1].split("|")[0])
               for line in MEGATRON_LOG.read_text().splitlines() if "max allocated:" in line)
    assert [row["max_allocated_mb"] for row in rows] == [peak, peak]
    assert rows[0]["ms_per_iter"] == rows[1]["ms_per_iter"] and rows[0]["gini"] == rows[1]["gini"]


def test_online_run_through_the_api(tmp_path, wandb_offline, monkeypatch):
    """The API path's use of wandb.Api: config and scan_history rows (flat keys, `_step`), as the
    public API returns them; the server itself cannot be reached from the tests."""
    reports = [report(step, [1, 2]) for step in (20, 40, 60)]
    writer = make_writers(["local"], tmp_path / "local", {"dispatcher": "alltoall"})
    for r in reports:
        writer.write(r)
    writer.close()
    asked = {}

    class FakeRun:
        config = {"moe_probe": {"dispatcher": "alltoall"}, "expert_model_parallel_size": 2}

        def scan_history(self):
            for r in reports:
                yield {"_step": r.step, "_runtime": 1.0, **r.scalars(), "moe_heatmap/x": {"_type": "image-file"}}

    class FakeApi:
        def __init__(self, timeout=None):
            asked["timeout"] = timeout

        def run(self, path):
            asked["path"] = path
            return FakeRun()

    monkeypatch.setattr(wandb_offline, "Api", FakeApi)
    local_row, online_row = compare([tmp_path / "local", "wandb:me/proj/abc123"], {}, warmup=10, wandb_timeout=7)
    assert asked["path"] == "me/proj/abc123" and asked["timeout"] > 7  # outwaits wandb's service (see read_online)
    assert online_row["run"] == "wandb:me/proj/abc123"
    for key in local_row.keys() - {"run"}:
        assert same(local_row[key], online_row[key]), key


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wandb_path_without_network_fails_fast_and_clearly(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
           "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "megatron_moe_probe.cli", "compare", "wandb:me/proj/abc123", "--wandb-timeout", "2"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert time.monotonic() - start < 20
    assert proc.returncode == 2
    assert "cannot reach wandb" in proc.stderr and "wandb sync" in proc.stderr and "offline-run" in proc.stderr
    bad = subprocess.run([*cmd[:4], "wandb:proj-only"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "wandb:ENTITY/PROJECT/RUN_ID" in bad.stderr


def test_bad_wandb_folders(tmp_path, wandb_offline, monkeypatch):
    with pytest.raises(UsageError, match="not a run folder"):
        compare([tmp_path / "missing"], {}, warmup=0)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="not a run folder"):
        compare([tmp_path / "file.txt"], {}, warmup=0)

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "run-abc.wandb").write_bytes(b"not a wandb file at all")
    with pytest.raises(UsageError, match="not a wandb transaction log"):
        compare([fake], {}, warmup=0)
    (fake / "run-def.wandb").write_bytes(b"")
    with pytest.raises(UsageError, match="expected one run-\\*.wandb file, found 2"):
        compare([fake], {}, warmup=0)

    writers = make_writers(["wandb"], tmp_path / "probe", {})
    for step in (5, 10, 15):
        writers.write(report(step, list(range(1, 30))))
    writers.close()
    run_dir = offline_run_dir(tmp_path / "probe")
    (log_file,) = run_dir.glob("run-*.wandb")
    data = bytearray(log_file.read_bytes())
    log_file.write_bytes(data[:-20])  # the last record still being written: the rest is read
    assert compare([run_dir], {}, warmup=0)[0]["intervals"] == 3
    data[data.rindex(b"moe/layer_07/gini")] ^= 0xFF  # a damaged byte inside the last report's record
    log_file.write_bytes(data)
    with pytest.raises(UsageError, match=r"chunk at byte \d+ is corrupt .checksum mismatch"):
        compare([run_dir], {}, warmup=0)
    data[11:13] = b"\xff\xff"  # the first chunk's length, past its block: not a run being written
    log_file.write_bytes(data)
    with pytest.raises(UsageError, match="chunk at byte 7 is corrupt .length 65535"):
        compare([run_dir], {}, warmup=0)

    (tmp_path / "plain").mkdir()  # a wandb run without probe keys
    plain = wandb_offline.init(project="p", dir=str(tmp_path / "plain"), mode="offline")
    plain.log({"lm loss": 1.0}, step=1)
    plain.finish()
    plain_dir = offline_run_dir(tmp_path / "plain")
    with pytest.raises(UsageError, match="no probe reports"):
        compare([plain_dir], {}, warmup=0)
    monkeypatch.setitem(sys.modules, "wandb.proto.wandb_internal_pb2", None)  # a wandb without the Record class
    with pytest.raises(UsageError, match=f"wandb {wandb_offline.__version__} has no"):
        compare([plain_dir], {}, warmup=0)
