"""Writers against real files, real TensorBoard event files and a real offline wandb run.

Expected values are computed here from the reports, never copied from writer output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record import IntervalReport
from megatron_moe_probe import record
from megatron_moe_probe.writers import base, local
from megatron_moe_probe.writers.base import WriterSet, make_writers
from megatron_moe_probe.record import CorruptRunError, load_layer_table, load_run
from megatron_moe_probe.writers.local import LocalWriter

LOGGER = "megatron_moe_probe"

SUMMARIZED = ("max_over_mean", "gini", "cv", "entropy", "dead_experts", "rank_max_over_mean")
STAT_NAMES = (
    "tokens max_over_mean min_over_mean gini cv entropy dead_experts rank_max_over_mean receiver_skew "
    "sender_skew local_tokens intra_node_tokens inter_node_tokens inter_node_fraction dropped_tokens "
    "dropped_fraction dispatch_fwd_ms combine_fwd_ms dispatch_bwd_ms combine_bwd_ms"
).split() + [f"{n}_{k}" for n in SUMMARIZED for k in ("step_mean", "step_worst")]


def make_report(step: int, layers=(1, 3, 4), num_experts: int = 8, ep_size: int = 2, **overrides) -> IntervalReport:
    """A report with every statistic, some NaN, one unknown extra key, counts that vary by step."""
    rng = random.Random(step)
    tokens = [[rng.randint(0, 500) for _ in range(num_experts)] for _ in layers]
    tokens[-1][0] = 0  # a dead expert
    per_layer = []
    for i, counts in enumerate(tokens):
        row = {name: round(rng.uniform(0.0, 3.0), 6) for name in STAT_NAMES}
        row["tokens"] = float(sum(counts))
        row["dead_experts"] = float(sum(c == 0 for c in counts))
        row["dropped_tokens"] = float(rng.randint(0, 50))
        row["extra_stat_from_the_future"] = float(i)
        per_layer.append(row)
    per_layer[0]["cv"] = math.nan  # undefined statistic
    per_layer[1]["combine_bwd_ms"] = math.nan
    rank = [[[rng.randint(0, 99) for _ in range(ep_size)] for _ in range(ep_size)] for _ in layers]
    fields = dict(
        step=step,
        steps=10,
        time=1_700_000_000.0 + step,
        layers=list(layers),
        num_experts=num_experts,
        ep_size=ep_size,
        per_layer=per_layer,
        tokens_per_expert=tokens,
        rank_matrix=rank,
        dropped_per_expert=[[0] * num_experts for _ in layers],
        meta={"dispatcher": "alltoall", "note": None},
    )
    fields.update(overrides)
    return IntervalReport(**fields)


def comparable(report: IntervalReport) -> str:
    """A canonical text form in which NaN equals NaN."""
    return json.dumps(report.to_dict(), sort_keys=True)  # json writes NaN as the token NaN


def same_number(a, b) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.reports: list[IntervalReport] = []
        self.meta = None
        self.closed = 0

    def write_meta(self, meta):
        self.meta = meta

    def write(self, report):
        self.reports.append(report)

    def close(self):
        self.closed += 1


class Boom(Recorder):
    def __init__(self, name: str, fail_at: int) -> None:
        super().__init__(name)
        self.fail_at = fail_at
        self.calls = 0

    def write(self, report):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(28, "No space left on device")
        super().write(report)


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------- local store


def test_jsonl_round_trip_and_meta(tmp_path):
    reports = [make_report(step) for step in (10, 20, 30)]
    meta = {"args": {"num_experts": 8, "lr": float("inf"), "path": tmp_path}, "dispatcher": "alltoall"}
    writer = LocalWriter(tmp_path / "run")
    writer.write_meta(meta)
    for r in reports:
        writer.write(r)
    writer.close()

    lines = (tmp_path / "run" / "intervals.jsonl").read_text().splitlines()
    assert len(lines) == len(reports)

    def reject(token):
        raise AssertionError(f"non-strict JSON token {token}")

    first = json.loads(lines[0], parse_constant=reject)
    assert first["per_layer"][0]["cv"] is None  # NaN written as null
    assert first["per_layer"][0]["gini"] == reports[0].per_layer[0]["gini"]

    loaded_meta, loaded = load_run(tmp_path / "run")
    assert [comparable(r) for r in loaded] == [comparable(r) for r in reports]
    assert math.isnan(loaded[0].per_layer[0]["cv"])
    assert loaded_meta["dispatcher"] == "alltoall"
    assert loaded_meta["args"]["num_experts"] == 8
    assert loaded_meta["args"]["lr"] is None  # inf is not JSON
    assert loaded_meta["args"]["path"] == str(tmp_path)
    assert loaded_meta["store"]["report_schema"] == reports[0].schema
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    # load_run also accepts the JSONL path itself
    assert len(load_run(tmp_path / "run" / "intervals.jsonl")[1]) == len(reports)


def test_parquet_layer_table(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    reports = [make_report(step) for step in (5, 10)]
    reports.append(make_report(15, layers=(1, 3)))  # fewer layers in one interval
    reports[-1].per_layer[0].pop("gini")  # a statistic absent from one row
    w = LocalWriter(tmp_path)
    for r in reports:
        w.write(r)
    w.close()

    table = pq.read_table(tmp_path / "layers.parquet")
    assert table.num_rows == sum(len(r.layers) for r in reports)
    names = table.column_names
    assert names[:4] == ["step", "steps", "time", "layer"]
    assert set(names[4:]) == set(STAT_NAMES) | {"extra_stat_from_the_future"}

    rows = load_layer_table(tmp_path)
    expected = [(r, layer, stats) for r in reports for layer, stats in zip(r.layers, r.per_layer)]
    assert [(row["step"], row["layer"]) for row in rows] == [(r.step, layer) for r, layer, _ in expected]
    for row, (r, _, stats) in zip(rows, expected):
        assert row["steps"] == r.steps and row["time"] == r.time
        for name in names[4:]:
            want = stats.get(name, math.nan)
            assert same_number(row[name], float(want)), (row["step"], row["layer"], name)
    # the same table derived from the JSONL when there is no parquet file
    (tmp_path / "layers.parquet").unlink()
    derived = load_layer_table(tmp_path)
    assert [json.dumps(r, sort_keys=True) for r in derived] == [json.dumps(r, sort_keys=True) for r in rows]


def test_without_pyarrow_still_writes_jsonl(tmp_path, monkeypatch):
    def no_pyarrow():
        raise ImportError("No module named 'pyarrow'")

    monkeypatch.setattr(record.table, "_import_pyarrow", no_pyarrow)
    reports = [make_report(s) for s in (1, 2)]
    with make_writers(["local"], tmp_path, {"x": 1}) as writers:
        for r in reports:
            writers.write(r)
    assert not (tmp_path / "layers.parquet").exists()
    assert [comparable(r) for r in load_run(tmp_path)[1]] == [comparable(r) for r in reports]
    rows = load_layer_table(tmp_path)
    assert len(rows) == sum(len(r.layers) for r in reports)
    assert rows[0]["gini"] == reports[0].per_layer[0]["gini"]


def test_stale_parquet_is_not_used(tmp_path):
    pytest.importorskip("pyarrow")
    w = LocalWriter(tmp_path)
    w.write(make_report(10))
    w.close()
    assert (tmp_path / "layers.parquet").exists()
    w2 = LocalWriter(tmp_path)  # resumed, then killed before close: parquet not rewritten
    w2.write(make_report(20))
    w2._file.flush()
    rows = load_layer_table(tmp_path)
    assert sorted({row["step"] for row in rows}) == [10, 20]
    w2.close()


def test_parquet_every(tmp_path):
    pytest.importorskip("pyarrow")
    w = LocalWriter(tmp_path, parquet_every=2)
    w.write(make_report(1))
    assert not (tmp_path / "layers.parquet").exists()
    w.write(make_report(2))
    assert (tmp_path / "layers.parquet").exists()
    w._file.close()  # leave without close(): the periodic table is there


def test_killed_mid_write_leaves_a_readable_run(tmp_path, caplog):
    n = 4
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_writers import make_report
        from megatron_moe_probe.record import encode_report
        from megatron_moe_probe.writers.local import LocalWriter
        w = LocalWriter({str(tmp_path)!r})
        for i in range({n}):
            w.write(make_report(10 * (i + 1)))
        line = encode_report(make_report(999))
        w._file.write(line[: len(line) // 2])  # the kill lands in the middle of a record
        w._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, reports = load_run(tmp_path)
    assert [r.step for r in reports] == [10 * (i + 1) for i in range(n)]
    assert [comparable(r) for r in reports] == [comparable(make_report(10 * (i + 1))) for i in range(n)]
    assert len(warnings_of(caplog)) == 1 and "cut-short" in warnings_of(caplog)[0].getMessage()

    # Resuming into the same folder removes the fragment and appends cleanly.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        w = LocalWriter(tmp_path)
        w.write(make_report(50))
        w.close()
        _, reports = load_run(tmp_path)
    assert [r.step for r in reports] == [10, 20, 30, 40, 50]
    messages = [r.getMessage() for r in warnings_of(caplog)]  # the killed writer's lock is named, then the fragment
    assert len(messages) == 2 and "took over the lock left by pid" in messages[0] and "partial record" in messages[1]


def test_corruption_in_the_middle_raises(tmp_path):
    w = LocalWriter(tmp_path)
    for s in (1, 2, 3):
        w.write(make_report(s))
    w.close()
    path = tmp_path / "intervals.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:40] + "\n"
    path.write_text("".join(lines))
    with pytest.raises(CorruptRunError, match=r"intervals.jsonl:2:"):
        load_run(tmp_path)


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(CorruptRunError, match="run folder"):
        load_run(tmp_path / "nope")


def test_restart_supersedes_recomputed_steps(tmp_path):
    w = LocalWriter(tmp_path)
    for s in (10, 20, 30):
        w.write(make_report(s, steps=1))
    w.close()
    w = LocalWriter(tmp_path)  # resumed from the checkpoint at step 15
    for s in (20, 30, 40):
        w.write(make_report(s, steps=2))
    w.close()
    reports = load_run(tmp_path)[1]
    assert [(r.step, r.steps) for r in reports] == [(10, 1), (20, 2), (30, 2), (40, 2)]


# ---------------------------------------------------------------------------- fan-out and factory


def test_failing_writer_is_dropped_once_and_others_get_everything(caplog):
    a, bad, b = Recorder("a"), Boom("bad", fail_at=2), Recorder("b")
    writers = WriterSet([a, bad, b])
    reports = [make_report(s) for s in range(1, 6)]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        writers.write_meta({"k": 1})
        for r in reports:
            writers.write(r)
        writers.close()
    warns = warnings_of(caplog)
    assert len(warns) == 1
    message = warns[0].getMessage()
    assert "'bad'" in message and "No space left on device" in message and "step 2" in message
    assert a.reports == reports and b.reports == reports
    assert bad.reports == reports[:1] and bad.calls == 2  # never called again after failing
    assert bad.closed == 1 and a.closed == 1 and b.closed == 1
    assert a.meta == {"k": 1}
    assert writers.names == [] and "bad" in writers.dropped


def test_close_never_raises(caplog):
    class BadClose(Recorder):
        def close(self):
            raise RuntimeError("flush failed")

    ok = Recorder("ok")
    writers = WriterSet([BadClose("badclose"), ok])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        writers.close()
    assert ok.closed == 1
    assert len(warnings_of(caplog)) == 1 and "badclose" in warnings_of(caplog)[0].getMessage()


def test_disk_full_local_writer_is_dropped(tmp_path, caplog, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    (tmp_path / "intervals.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    rec = Recorder("rec")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        writers = make_writers(["local", "console"], tmp_path, {"a": 1})
        writers.add(rec)
        assert writers.names == ["local", "console", "rec"]
        reports = [make_report(s) for s in (1, 2, 3)]
        for r in reports:
            writers.write(r)
        writers.close()
    warns = warnings_of(caplog)
    assert len(warns) == 1 and "'local'" in warns[0].getMessage() and "No space left" in warns[0].getMessage()
    assert rec.reports == reports
    assert capsys.readouterr().out.count("moe-probe step") == 3


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder the local writer cannot create or write into, as root too."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").mkdir()
    except PermissionError:
        return locked / "run"  # an ordinary user: chmod is enough
    (locked / "probe").rmdir()  # root ignores the mode bits: use a path under a regular file
    locked.chmod(0o700)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "run"


def test_unwritable_folder_skips_local_writer(tmp_path, caplog, capsys):
    out = unwritable_dir(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        writers = make_writers(["local", "console"], out, {"a": 1})
        assert writers.names == ["console"]
        writers.write(make_report(7))
        writers.close()
    warns = warnings_of(caplog)
    assert len(warns) == 1 and "cannot start the 'local' writer" in warns[0].getMessage()
    assert "moe-probe step 7" in capsys.readouterr().out


def test_missing_package_skips_writer(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        writers = make_writers(["wandb", "local"], tmp_path, {})
    assert writers.names == ["local"]
    warns = warnings_of(caplog)
    assert len(warns) == 1 and "'wandb'" in warns[0].getMessage() and "pip install" in warns[0].getMessage()
    writers.close()


def test_factory_names_and_ranks(tmp_path):
    with pytest.raises(UsageError) as err:
        make_writers(["local", "csv"], tmp_path, {})
    for allowed in ("local", "tensorboard", "wandb", "console"):
        assert allowed in str(err.value)
    with pytest.raises(UsageError):  # a typo fails on every rank, not only on rank 0
        make_writers(["csv"], tmp_path, {}, rank=3)
    empty = make_writers(["local", "console"], tmp_path / "r1", {"a": 1}, rank=1)
    assert len(empty) == 0 and not (tmp_path / "r1").exists()
    empty.write(make_report(1))
    empty.close()
    assert base.parse_writer_names("local, console,local") == ["local", "console"]
    assert base.parse_writer_names(None) == ["local"]


# ---------------------------------------------------------------------------- TensorBoard


def read_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_and_slow_heatmap(tmp_path):
    pytest.importorskip("tensorboard")
    reports = [make_report(step) for step in (10, 20, 30, 40, 50)]
    writers = make_writers(["tensorboard"], tmp_path, {"dispatcher": "alltoall"}, heatmap_every=2)
    assert writers.names == ["tensorboard"]
    for r in reports:
        writers.write(r)
    writers.close()

    acc = read_events(tmp_path / "tensorboard")
    tags = acc.Tags()
    expected: dict[str, dict[int, float]] = {}
    for r in reports:
        for tag, value in r.scalars().items():
            expected.setdefault(tag, {})[r.step] = value
    assert set(tags["scalars"]) == set(expected)
    assert "moe/layer_01/gini" in expected and "moe/layer_01/cv" not in expected  # NaN is not logged
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got.keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)

    slow_steps = [r.step for i, r in enumerate(reports) if i % 2 == 0]
    assert tags["images"] == ["moe_heatmap/load_over_mean"]
    images = acc.Images("moe_heatmap/load_over_mean")
    assert [im.step for im in images] == slow_steps
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    hist_tags = {f"moe_hist/layer_{n:02d}/tokens_per_expert" for n in reports[0].layers}
    assert set(tags["histograms"]) == hist_tags
    for r_index, h in enumerate(acc.Histograms("moe_hist/layer_03/tokens_per_expert")):
        report = reports[2 * r_index]
        counts = report.tokens_per_expert[report.layers.index(3)]
        assert h.step == report.step
        assert h.histogram_value.num == len(counts) and h.histogram_value.sum == pytest.approx(sum(counts))
    assert [h.step for h in acc.Histograms("moe_hist/layer_03/tokens_per_expert")] == slow_steps


def test_tensorboard_existing_writer_is_not_closed(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from megatron_moe_probe.writers.tensorboard import TensorBoardWriter

    mine = SummaryWriter(log_dir=str(tmp_path / "megatron_tb"))
    w = TensorBoardWriter(existing=mine, heatmap_every=100)
    report = make_report(3)
    w.write(report)
    w.close()
    mine.add_scalar("lm loss", 1.25, 3)  # still usable: we did not close Megatron's writer
    mine.close()
    acc = read_events(tmp_path / "megatron_tb")
    assert "lm loss" in acc.Tags()["scalars"]
    gini = acc.Scalars("moe/layer_01/gini")
    assert [(e.step, round(e.value, 5)) for e in gini] == [(3, round(report.per_layer[0]["gini"], 5))]


# ---------------------------------------------------------------------------- wandb (offline)


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb file (a LevelDB-style log of protobuf Records: 7-byte file header,
    32 KiB blocks, 7-byte chunk headers: crc32c u32, length u16, type u8)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:  # FULL
            chunks.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def finished_wandb_records(path: Path, timeout: float = 20.0) -> list:
    """Records once the file holds the run's exit record: wandb's service process may still
    be writing the file for a moment after run.finish() has returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_history(path: Path) -> dict[int, dict[str, object]]:
    history: dict[int, dict[str, object]] = {}
    for record in finished_wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, object] = {}
        for item in record.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
        history[int(row["_step"])] = row
    return history


def test_wandb_offline_run_holds_the_history(tmp_path, wandb_offline, caplog):
    reports = [make_report(step) for step in (10, 20, 30)]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        writers = make_writers(["wandb"], tmp_path / "run", {"dispatcher": "alltoall"}, heatmap_every=2)
        assert writers.names == ["wandb"]
        for r in reports:
            writers.write(r)
        writers.close()
    assert warnings_of(caplog) == []
    assert wandb_offline.run is None  # we started it, so we finished it

    run_dirs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    files = list(run_dirs[0].glob("run-*.wandb"))
    assert len(files) == 1
    history = wandb_history(files[0])
    assert sorted(history) == [r.step for r in reports]
    for i, r in enumerate(reports):
        row = history[r.step]
        for key, value in r.scalars().items():
            assert row[key] == pytest.approx(value), (r.step, key)
        has_heatmap = "moe_heatmap/load_over_mean/_type" in row
        assert has_heatmap == (i % 2 == 0), r.step
        hist_key = "moe_hist/layer_04/tokens_per_expert/_type"
        assert (row.get(hist_key) == "histogram") == (i % 2 == 0)
    config = [
        u
        for rec in read_wandb_records(files[0])
        if rec.WhichOneof("record_type") == "config"
        for u in rec.config.update
    ]
    assert any(u.key == "moe_probe" and json.loads(u.value_json)["dispatcher"] == "alltoall" for u in config)


def test_wandb_reuses_an_active_run_and_leaves_it_open(tmp_path, wandb_offline):
    run = wandb_offline.init(project="megatron-like", dir=str(tmp_path), mode="offline")  # as Megatron does
    writers = make_writers(["wandb"], tmp_path / "probe", {"a": 1})
    report = make_report(5)
    writers.write(report)
    writers.close()
    assert wandb_offline.run is run  # not finished by us
    run.log({"lm loss": 2.0}, step=6)
    run.finish()
    assert not (tmp_path / "probe" / "wandb").exists()  # no second run was started
    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    history = wandb_history(files[0])
    assert history[5]["moe/layer_01/gini"] == pytest.approx(report.per_layer[0]["gini"])
    assert history[6]["lm loss"] == 2.0


# ---------------------------------------------------------------------------- console and heatmap


def test_console_table_has_a_row_per_layer(capsys):
    from megatron_moe_probe.writers.console import ConsoleWriter

    report = make_report(40, layers=(2, 5, 11))
    report.per_layer[1].pop("gini")  # missing key -> '-'
    for row in report.per_layer:  # no timing at all: the timing columns disappear
        for key in ("dispatch_fwd_ms", "combine_fwd_ms", "dispatch_bwd_ms", "combine_bwd_ms"):
            row.pop(key)
    report.per_layer[2]["dispatch_fwd_ms"] = 1.234  # ... except this one

    from rich.console import Console

    w = ConsoleWriter(console=Console(width=200))  # a wide terminal: one table
    w.write(report)
    w.close()
    out = capsys.readouterr().out
    assert f"step {report.step}" in out

    def ratio(v):
        return "-" if v is None or math.isnan(v) else f"{v:.3f}"

    def count(v):
        return "-" if v is None or math.isnan(v) else f"{int(round(v)):,}"

    def pct(v):
        return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}%"

    headers = "\n".join(line for line in out.splitlines()[:6])
    assert "dispatch" in headers and "combine" not in headers
    for layer, stats in zip(report.layers, report.per_layer):
        g = stats.get
        expected = [
            str(layer),
            count(g("tokens")),
            ratio(g("max_over_mean")),
            ratio(g("max_over_mean_step_mean")),
            ratio(g("max_over_mean_step_worst")),
            ratio(g("gini")),
            ratio(g("cv")),
            ratio(g("entropy")),
            count(g("dead_experts")),
            ratio(g("rank_max_over_mean")),
            ratio(g("receiver_skew")),
            pct(g("inter_node_fraction")),
            count(g("dropped_tokens")),
            pct(g("dropped_fraction")),
            "-" if g("dispatch_fwd_ms") is None else f"{g('dispatch_fwd_ms'):.2f}",
        ]
        lines = [line.split() for line in out.splitlines() if line.split()[:1] == [str(layer)]]
        assert lines == [expected], (layer, lines)


def test_console_table_fits_80_columns_without_cut_cells(capsys):
    """An 80-column terminal (or a log) gets every value whole: a table too wide is split."""
    from rich.console import Console

    from megatron_moe_probe.writers.console import ConsoleWriter, table_rows

    report = make_report(40, layers=(2, 5, 11))  # every column, timing and drops included
    ConsoleWriter(console=Console(width=80)).write(report)
    out = capsys.readouterr().out
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    assert "…" not in out
    words = out.split()
    for cells in table_rows(report):
        assert all(c in words for c in cells)


def test_heatmap_values_and_png():
    from megatron_moe_probe.writers.heatmap import heatmap_png, heatmap_rgb, load_over_mean

    report = make_report(1, tokens_per_expert=[[1, 3], [0, 0]], layers=[1, 2], num_experts=2)
    report.per_layer = report.per_layer[:2]
    grid = load_over_mean(report)
    assert grid[0] == [0.5, 1.5] and all(math.isnan(v) for v in grid[1])
    assert heatmap_png(report)[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = heatmap_rgb(report)
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype.name == "uint8"


def test_json_safe_conversion():
    np = pytest.importorskip("numpy")
    data = record.to_json_safe({"a": np.int64(3), "b": np.float32(0.5), "c": (1, float("nan")), 4: np.array(2.0)})
    assert data == {"a": 3, "b": 0.5, "c": [1, None], "4": 2.0}
    assert json.dumps(data, allow_nan=False)
