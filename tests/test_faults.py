"""Fault injection on the real `moe-probe` entry points (subprocesses), one group per class of
issue 11: a user's runs are never mixed, lost or left running; every mistake gets one clear line.

Each mistake must end with exit code 2 and exactly one line on stderr, no traceback; nothing that
existed before may change; no process may be left behind. Runs are tiny (demo --steps 2 or fake
run folders written with record.write_run) and every subprocess has a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CLI, DATA, ENV, assert_one_line_error, cli, fake_run, tree_state
from helpers import alive as _alive
from helpers import wait_gone as _wait_gone
from megatron_moe_probe import record

RUN = DATA / "h200_run_mock"


def _children_of(pid: int) -> list[int]:
    from megatron_moe_probe.lifetime import descendants

    return descendants(pid)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# ------------------------------------------------------------------------------------------------
# 1. Two runs in one folder


def test_demo_refuses_a_folder_that_holds_another_run(tmp_path):
    run = fake_run(tmp_path / "run")
    before = tree_state(run)
    proc = cli("demo", "--steps", "2", "--out", run)
    assert_one_line_error(proc, "already holds a run", "--overwrite")
    assert tree_state(run) == before


def test_demo_never_overwrites_files_of_the_same_name_that_a_user_wrote(tmp_path):
    (tmp_path / "meta.json").write_text('{"mine": true}\n')
    (tmp_path / "train.jsonl").write_text("my own log\n")
    before = tree_state(tmp_path)
    for extra in ([], ["--overwrite"]):  # --overwrite replaces runs, never a user's files
        proc = cli("demo", "--steps", "2", "--out", ".", *extra, cwd=tmp_path)
        assert_one_line_error(proc, "not a moe-probe run")
        assert tree_state(tmp_path) == before


def test_matrix_refuses_an_out_folder_whose_names_it_would_use(tmp_path):
    mine = tmp_path / "ep2-alltoall-text"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    before = tree_state(tmp_path)
    proc = cli("matrix", "--demo", "--ep", "2", "--dispatcher", "alltoall", "--iters", "2", "--out", tmp_path)
    assert_one_line_error(proc, "choose a new --out")
    assert tree_state(tmp_path) == before


def test_build_dataset_refuses_to_replace_an_existing_dataset(tmp_path):
    (tmp_path / "in.txt").write_text("some text\n")
    (tmp_path / "ds.bin").write_bytes(b"user bytes")
    before = tree_state(tmp_path)
    proc = cli("build-dataset", "--input", tmp_path / "in.txt", "--output-prefix", tmp_path / "ds")
    assert_one_line_error(proc, "--overwrite")
    assert tree_state(tmp_path) == before


def test_training_run_folder_resumes_its_own_run_and_never_mixes_a_fresh_one(tmp_path):
    run = fake_run(tmp_path / "moe_probe")
    before = tree_state(run)
    assert record.training_run_folder(run, resumed=True) == run  # resume: append, supersede
    assert (run / record.LOCK_FILE).is_file()  # held for the writer until it closes
    record.release_lock(run)
    fresh = record.training_run_folder(run, resumed=False)
    assert fresh == tmp_path / "moe_probe-2" and [p.name for p in fresh.iterdir()] == [record.LOCK_FILE]
    record.release_lock(fresh)
    assert not any(fresh.iterdir())
    assert record.training_run_folder(tmp_path / "new", resumed=False) == tmp_path / "new"
    record.release_lock(tmp_path / "new")
    assert tree_state(run) == before
    # Two runs started in the same second never share a folder.
    a, b = record.fresh_run_folder(tmp_path / "demo-x"), record.fresh_run_folder(tmp_path / "demo-x")
    assert a != b


def test_overwrite_replaces_only_the_runs_files(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "notes.txt").write_text("keep me")
    record.claim_run_folder(run, files=("train.jsonl",), overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [record.LOCK_FILE, "notes.txt"]  # locked for the new run
    record.release_lock(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------
# 2 + 3 + 6. kill -9: no orphan, a durable training log, quiet output


@linux_only
def test_kill_9_of_the_demo_takes_its_ranks_and_keeps_the_training_log(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "demo", "--steps", "100000", "--interval", "1", "--quiet", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            log = out / "train.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 2 and (out / "intervals.jsonl").is_file() \
                    and (out / "intervals.jsonl").read_text().count("\n") >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        below = _children_of(proc.pid)
        assert len(below) >= 2, below  # the ranks (and multiprocessing's resource tracker)
        proc.kill()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _wait_gone(below) == [], "demo ranks outlived the demo"
    sizes = {name: (out / name).stat().st_size for name in ("intervals.jsonl", "train.jsonl")}
    time.sleep(1.5)
    assert {name: (out / name).stat().st_size for name in sizes} == sizes, "something still writes the run"
    lines = (out / "train.jsonl").read_text().splitlines()
    assert len(lines) >= 2 and json.loads(lines[0])["iteration"] == 1
    assert record.load_run(out)[1]
    for noise in ("No CUDA runtime is found", "GPTModel IS DEPRECATED", "leaked semaphore"):
        assert noise not in err, err


@linux_only
def test_the_guard_stops_everything_below_it_when_its_parent_is_killed(tmp_path):
    """What `moe-probe train` does for torchrun (whose workers start sessions of their own) and
    `matrix` for each cell: kill -9 of the parent stops all of it."""
    pids = tmp_path / "pids"
    inner = (f"import os, subprocess, sys, time\n"
             f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
             f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{p.pid}}')\n"
             f"time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time\n"
                               "from megatron_moe_probe import lifetime\n"
                               f"subprocess.Popen(lifetime.guarded([sys.executable, '-c', {inner!r}]))\n"
                               "time.sleep(120)\n"], env=ENV)
    deadline = time.monotonic() + 60
    while not (pids.is_file() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    below = _children_of(parent.pid)
    assert len(below) == 3, below  # guard, command, its own-session child
    parent.kill()
    parent.wait(timeout=10)
    assert _wait_gone(below) == [], "processes outlived the killed parent"


@linux_only
def test_kill_9_of_the_matrix_takes_the_running_cell(tmp_path):
    proc = subprocess.Popen([*CLI, "matrix", "--demo", "--ep", "2", "--dispatcher", "alltoall", "--iters", "100000",
                             "--out", str(tmp_path / "m")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV)
    try:
        deadline = time.monotonic() + 120
        below: list[int] = []
        while time.monotonic() < deadline and len(below) < 4:  # guard, demo, ranks
            time.sleep(0.3)
            below = _children_of(proc.pid)
        assert len(below) >= 4, below
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _wait_gone(below, 20) == [], "the cell outlived the matrix"


def test_the_training_log_survives_a_full_disk_with_one_warning(caplog):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    log = record.LineLog("/dev/full")
    for it in range(3):
        log.write({"iteration": it, "lm loss": float("nan")})
    log.close()
    log.close()
    warnings = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(warnings) == 1 and log.failed


def test_build_dataset_says_nothing_but_its_result(tmp_path):
    (tmp_path / "in.txt").write_text("one\ntwo\n")
    proc = cli("build-dataset", "--input", tmp_path / "in.txt", "--output-prefix", tmp_path / "ds", "--split-lines")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 2


# ------------------------------------------------------------------------------------------------
# 4. One line instead of a traceback


def _mistakes(tmp_path: Path) -> list[tuple[list, str]]:
    folder = tmp_path / "a_dir"
    folder.mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    return [
        (["compare", RUN, "--plot", folder], "is a directory"),
        (["compare", RUN, "--plot", tmp_path / "missing" / "x.png"], "does not exist"),
        (["compare", RUN, "--plot", tmp_path / "noext"], ".png"),
        (["compare", RUN, "--warmup", "-1"], "--warmup"),
        (["analyze", RUN, "--plot", folder], "is a directory"),
        (["analyze", tmp_path / "nothing-here"], "not a run folder"),
        (["demo", "--lr", "-1"], "--lr"),
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--steps", "x"], "invalid int"),
        (["demo", "--out", blocker], "is a file"),
        (["demo", "--out", blocker / "sub"], "cannot write the run folder"),
        (["train", "tiny-gpu", "--dry-run", "--nproc-per-node", "0"], "--nproc-per-node 0"),
        (["train", "tiny-gpu", "--dry-run", "--nnodes", "0"], "--nnodes 0"),
        (["matrix", "--demo", "--out", tmp_path / "m", "--cell-timeout", "-5"], "--cell-timeout"),
        (["build-dataset", "--input", blocker, "--output-prefix", blocker / "ds"], "is a file"),
        (["render", "no-such-recipe"], "no-such-recipe"),
        (["recommend", "--ep", "x"], "invalid int"),
        (["nonsense-command"], "invalid choice"),
    ]


def test_every_mistake_is_one_line_and_changes_nothing(tmp_path):
    failures = []
    for argv, needle in _mistakes(tmp_path):
        before = tree_state(tmp_path)
        proc = cli(*argv, cwd=tmp_path)
        try:
            assert_one_line_error(proc, needle)
            assert tree_state(tmp_path) == before, "files changed"
        except AssertionError as exc:
            failures.append(f"{argv}: {exc}")
    assert not failures, "\n".join(failures)


def test_train_dry_run_checks_the_probe_flags_with_megatrons_parser():
    pytest.importorskip("megatron.training")
    for flags, needle in ((["--moe-probe-interval", "-3"], "--moe-probe-interval"),
                          (["--moe-probe-writers", "local,slack"], "slack"),
                          (["--no-such-megatron-flag"], "unrecognized")):
        proc = cli("train", "tiny-gpu", "--dry-run", "--assume-installed", "none", "--", *flags, timeout=300)
        assert_one_line_error(proc, needle)
        assert proc.stdout == ""  # nothing printed, nothing launched


@pytest.mark.parametrize("damage", ["middle-line", "wrong-types", "meta-list", "layer-count"])
def test_damaged_run_folders_are_one_line(tmp_path, damage):
    run = fake_run(tmp_path / "run")
    good = (run / record.INTERVALS_FILE).read_text()
    if damage == "middle-line":
        (run / record.INTERVALS_FILE).write_text("{not json\n" + good)
    elif damage == "wrong-types":
        data = json.loads(good)
        data["per_layer"] = 5
        (run / record.INTERVALS_FILE).write_text(json.dumps(data) + "\n")
    elif damage == "meta-list":
        (run / record.META_FILE).write_text("[1, 2]\n")
    else:
        data = json.loads(good)
        data["layers"] = [1]
        (run / record.INTERVALS_FILE).write_text(good + json.dumps(data) + "\n")
    (run / record.LAYERS_FILE).unlink(missing_ok=True)
    for command in ("analyze", "compare"):
        assert_one_line_error(cli(command, run), str(run))


def test_a_closed_pipe_ends_quietly():
    for argv in (["recommend", "--ep", "8", "--hardware", "h100", "--assume-installed", "all", "--json",
                  "--explain"], ["compare", RUN, "--json"], ["render", "--list"]):
        proc = subprocess.Popen([*CLI, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        proc.stdout.read(1)
        proc.stdout.close()  # what `| head -c 1` does
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
        assert "Traceback" not in err and "BrokenPipe" not in err, (argv, err)
        assert proc.returncode in (0, 141), (argv, proc.returncode, err)


def test_a_full_stdout_is_one_line():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*CLI, "render", "--list"], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=60, env=ENV)
    assert_one_line_error(proc, "No space left on device")


# ------------------------------------------------------------------------------------------------
# 5. Output that tools and terminals can read


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_output_is_strict(tmp_path):
    nan_run = fake_run(tmp_path / "nan")  # no training log: NaN ms/iter, loss
    for argv in (["compare", RUN, nan_run, "--json"], ["analyze", RUN, "--json"],
                 ["recommend", "--ep", "8", "--hardware", "h100", "--assume-installed", "all", "--json"]):
        proc = cli(*argv)
        assert proc.returncode == 0, proc.stderr
        _strict(proc.stdout)


def test_tables_fit_80_columns():
    for argv in (["compare", RUN, DATA / "h200_run_text"], ["compare", RUN, DATA / "h200_run_text", "--wide"],
                 ["analyze", RUN]):
        proc = cli(*argv, env={"COLUMNS": "80"})
        assert proc.returncode == 0, proc.stderr
        wide = [line for line in proc.stdout.splitlines() if len(line.rstrip()) > 80]
        assert not wide, (argv, wide)
        assert "…" not in proc.stdout, argv


def test_compare_says_when_the_warmup_is_past_a_run(tmp_path):
    proc = cli("compare", RUN, "--warmup", "100000")
    assert proc.returncode == 0
    assert "within --warmup 100000" in proc.stderr


# ------------------------------------------------------------------------------------------------
# 8. Plots write exactly the path they print


def test_plots_write_the_path_they_print(tmp_path):
    for command in ("compare", "analyze"):
        png = tmp_path / f"{command}.png"
        proc = cli(command, RUN, "--plot", png)
        assert proc.returncode == 0, proc.stderr
        assert f"plot: {png}" in proc.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["analyze.png", "compare.png"]
