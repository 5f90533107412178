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
        (["demo", "--steps", "x"], "want an integer"),
        (["demo", "--out", blocker], "is a file"),
        (["demo", "--out", blocker / "sub"], "cannot write the run folder"),
        (["train", "tiny-gpu", "--dry-run", "--nproc-per-node", "0"], "--nproc-per-node 0"),
        (["train", "tiny-gpu", "--dry-run", "--nnodes", "0"], "--nnodes 0"),
        (["matrix", "--demo", "--out", tmp_path / "m", "--cell-timeout", "-5"], "--cell-timeout"),
        (["build-dataset", "--input", blocker, "--output-prefix", blocker / "ds"], "is a file"),
        (["render", "no-such-recipe"], "no-such-recipe"),
        (["recommend", "--ep", "x"], "want an integer"),
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


# ================================================================================================
# Issue 22: typed records at every boundary, one writer per run folder, one line for every mistake.
# Each class: through the real CLI (a subprocess for the headline cases, `main()` in process for
# the rest of the variants), exit 2 and one line, nothing changed, no process left.

from helpers import children, cli_in_process, cli_popen, make_report  # noqa: E402


def _mistake(tmp_path: Path, *argv, needles=(), env=None, cwd=None) -> str:
    """Run one mistake as a subprocess and check the whole contract; returns its line."""
    before, procs = tree_state(tmp_path), children()
    proc = cli(*argv, env=env, cwd=cwd or tmp_path)
    line = assert_one_line_error(proc, *needles)
    assert tree_state(tmp_path) == before, f"{argv}: files changed"
    assert children() - procs == set(), f"{argv}: a process was left behind"
    return line


def _mistakes_in_process(capsys, tmp_path: Path, cases) -> None:
    """More variants of a class through the same `main()`, in this process (no subprocess cost)."""
    failures = []
    for argv, needle in cases:
        before = tree_state(tmp_path)
        code, _, err = cli_in_process(capsys, *argv)
        lines = [line for line in err.splitlines() if line.strip()]
        if code != 2 or len(lines) != 1 or needle not in lines[0] or "internal error" in err \
                or tree_state(tmp_path) != before:
            failures.append(f"{argv}: exit {code}: {err.strip()[:300]}")
    assert not failures, "\n".join(failures)


# -- one writer per run folder -------------------------------------------------------------------

_WRITER = """
import sys, time
from megatron_moe_probe.writers.local import LocalWriter
from megatron_moe_probe.record import RunFolderBusy
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    w = LocalWriter(sys.argv[1])
except RunFolderBusy as exc:
    print("busy", exc, flush=True)
    sys.exit(2)
print("won", flush=True)
sys.stdin.read()  # hold the folder until the test says
w.close()
"""


def test_writers_started_at_the_same_moment_exactly_one_wins(tmp_path):
    """Real local writers (what the demo, `train`, Megatron's flags and the Bridge callback write
    through), four at the same instant into one folder, eight rounds: one wins every time."""
    for round_ in range(8):
        folder = tmp_path / f"r{round_}"
        folder.mkdir()
        start = time.time() + 1.2  # all started and imported before the moment comes
        procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(folder), str(start)], env=ENV,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        deadline = time.monotonic() + 60
        while sum(p.poll() is not None for p in procs) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        losers = [p for p in procs if p.poll() is not None]
        winners = [p for p in procs if p.poll() is None]
        assert len(winners) == 1 and len(losers) == 3, [p.poll() for p in procs]
        holder = winners[0].pid
        for p in losers:
            out = p.stdout.read()
            assert p.returncode == 2 and f"pid {holder}" in out, out
        winners[0].communicate("", timeout=30)
        assert winners[0].returncode == 0
        assert not (folder / record.LOCK_FILE).exists()  # released at close


def test_two_demos_into_one_folder_one_wins_the_other_names_it(tmp_path):
    """The issue's case: `moe-probe demo --out SAME` twice at once (different dispatchers)."""
    out = tmp_path / "same"
    for round_ in range(3):
        procs = [cli_popen("demo", "--steps", "100000", "--interval", "1", "--quiet", "--dispatcher", d,
                           "--out", out, "--overwrite", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for d in ("alltoall", "allgather")]
        try:
            deadline = time.monotonic() + 120
            while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.05)
            losers = [p for p in procs if p.poll() is not None]
            assert len(losers) == 1, [p.poll() for p in procs]
            loser, winner = losers[0], next(p for p in procs if p is not losers[0])
            err = loser.stderr.read()
            assert loser.returncode == 2 and len(err.strip().splitlines()) == 1, err
            assert f"pid {winner.pid}" in err and "being written by another run" in err, err
            assert winner.poll() is None  # the winner trains on, alone
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        if (out / record.INTERVALS_FILE).exists():
            steps = [r.step for r in record.iter_reports(out)]
            assert steps == sorted(set(steps)), steps  # one run's records, never two interleaved


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and /proc")
def test_a_lock_left_by_a_killed_writer_does_not_block_the_next_run(tmp_path):
    run = fake_run(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _WRITER, str(run), "0"], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "won"
    busy = cli("demo", "--steps", "2", "--out", run, "--overwrite")
    assert_one_line_error(busy, f"pid {holder.pid}")  # alive: refused, named
    holder.kill()
    holder.wait(timeout=10)
    assert (run / record.LOCK_FILE).exists()  # a SIGKILL leaves the file behind ...
    # ... and a resumed training run takes it over, into its own folder (not <folder>-2).
    code = ("from megatron_moe_probe import record; import sys\n"
            "print(record.training_run_folder(sys.argv[1], resumed=True))")
    proc = subprocess.run([sys.executable, "-c", code, str(run)], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == str(run), proc.stderr
    assert f"took over the lock left by pid {holder.pid}" in proc.stderr


def test_a_relaunch_while_the_first_training_still_writes_moves_aside(tmp_path):
    """Two training jobs given the same --moe-probe-dir: the second never mixes into the first."""
    run = tmp_path / "moe_probe"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _WRITER, str(run), "0"], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "won"
        for resumed in (False, True):
            code = ("from megatron_moe_probe import record; import sys\n"
                    f"print(record.training_run_folder(sys.argv[1], resumed={resumed}))")
            proc = subprocess.run([sys.executable, "-c", code, str(run)], env=ENV, capture_output=True, text=True,
                                  timeout=60)
            assert proc.stdout.strip().startswith(str(run) + "-"), (proc.stdout, proc.stderr)
            assert f"pid {holder.pid}" in proc.stderr
    finally:
        holder.communicate("", timeout=30)


# -- nothing half-written: a full disk -----------------------------------------------------------

def _full_disk_after(limit: int):
    """preexec_fn: every file the command writes may grow to `limit` bytes, then writes fail
    with EFBIG as on a full disk (Python ignores SIGXFSZ, so it is an OSError, not a kill)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _trace_dump(folder: Path, steps: int = 4, tokens: int = 64) -> Path:
    folder.mkdir()
    lines = [json.dumps({"step": s, "stage": "fwd", "block": "decoder", "layer": layer, "rank": 0,
                         "num_tokens": tokens, "topk": 2, "top_indices": [[t % 8, (t + 1) % 8] for t in range(tokens)]})
             for s in range(steps) for layer in (0, 1)]
    (folder / "router_trace_rank0.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE")
def test_import_on_a_full_disk_leaves_nothing_and_a_retry_works(tmp_path):
    dump = _trace_dump(tmp_path / "dump")
    out = tmp_path / "run"
    before = tree_state(tmp_path)
    proc = subprocess.run([*CLI, "import", str(dump), "--out", str(out), "--interval", "1"], capture_output=True,
                          text=True, timeout=300, env=ENV, preexec_fn=_full_disk_after(1500))
    assert_one_line_error(proc, "File too large")
    assert tree_state(tmp_path) == before  # no half run, no temporary folder
    ok = cli("import", dump, "--out", out, "--interval", "1", timeout=300)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    notes = record.load_meta(out)["imported"]["notes"]
    assert notes and ok.stdout.count("note:") == len(notes)  # each note once, on stdout only (issue 25)
    assert [r.step for r in record.load_run(out)[1]] == [1, 2, 3, 4]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE")
def test_the_demo_on_a_full_disk_keeps_its_records_and_leaves_no_partial_plot(tmp_path):
    """Every file may grow to 40 kB: the records fit, the plot (about 60 kB) does not."""
    out = tmp_path / "run"
    proc = subprocess.run([*CLI, "demo", "--steps", "2", "--interval", "1", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=ENV, preexec_fn=_full_disk_after(40_000))
    assert proc.returncode == 0, proc.stderr
    assert "plot not written" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["intervals.jsonl", "iterations", "layers.parquet", "meta.json",
                                                     "train.jsonl"]  # no imbalance.png, no temp file, no lock
    assert [r.step for r in record.load_run(out)[1]] == [1, 2]


def test_a_folder_with_records_but_no_meta_is_refused(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / record.META_FILE).unlink()
    _mistake(tmp_path, "compare", run, needles=("records but no meta.json",))


def test_an_atomic_plot_is_whole_or_absent(tmp_path):
    from megatron_moe_probe.commands import save_figure

    class Failing:
        def savefig(self, path, **kw):
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_figure(Failing(), tmp_path / "plot.png")
    assert list(tmp_path.iterdir()) == []


# -- wrong JSON types in meta.json ---------------------------------------------------------------

def _with_meta(tmp_path: Path, name: str, **fields) -> Path:
    run = fake_run(tmp_path / name)
    meta = json.loads((run / record.META_FILE).read_text())
    meta.update(fields)
    (run / record.META_FILE).write_text(json.dumps(meta))
    return run


def test_meta_json_with_wrong_types_is_one_line(tmp_path, capsys):
    hw = _with_meta(tmp_path, "hw", hardware="H100")
    _mistake(tmp_path, "compare", hw, needles=("meta.json", "field hardware", "an object"))
    _mistake(tmp_path, "analyze", _with_meta(tmp_path, "model", model=5), needles=("field model",))
    cases = [(["compare", _with_meta(tmp_path, "args", args="--foo")], "field args"),
             (["analyze", _with_meta(tmp_path, "args2", args="--foo")], "field args"),
             (["compare", _with_meta(tmp_path, "cmd", command="torchrun x")], "field command"),
             (["compare", _with_meta(tmp_path, "probe", probe=[1])], "field probe"),
             (["compare", _with_meta(tmp_path, "recipe", recipe=3)], "field recipe"),
             (["compare", _with_meta(tmp_path, "gpus", hardware={"gpus": "H100"})], "field hardware.gpus"),
             (["compare", _with_meta(tmp_path, "ws", world_size=0)], "field world_size"),
             (["compare", _with_meta(tmp_path, "st", settings={"topk": "two"})], "settings"),
             (["compare", _with_meta(tmp_path, "disp", dispatcher={"x": 1})], "field dispatcher")]
    _mistakes_in_process(capsys, tmp_path, cases)


def test_old_run_folders_still_read_and_new_ones_carry_typed_settings(tmp_path):
    from megatron_moe_probe.record import settings_of

    for old in (DATA / "h200_run_mock", DATA / "h200_run_text"):
        meta, reports = record.load_run(old)
        settings, sources = settings_of(meta)
        assert "settings" not in meta and settings.topk == 4 and settings.expert_parallel == 2
        assert sources["topk"] == "meta command --moe-router-topk" and settings.precision == "bf16"
    run = fake_run(tmp_path / "new", model={"hidden_size": 64, "topk": 2, "ep": 2})
    meta = json.loads((run / record.META_FILE).read_text())
    assert meta["settings"] == {"hidden_size": 64, "topk": 2, "expert_parallel": 2, "precision": "fp32",
                                "data": "text", "dispatcher": "allgather"}
    assert meta["settings_from"]["hidden_size"] == "meta model.hidden_size"


# -- records that disagree with themselves, and huge numbers ---------------------------------------

def _damaged(tmp_path: Path, name: str, change) -> Path:
    run = fake_run(tmp_path / name, reports=[make_report(4), make_report(8)])
    path = run / record.INTERVALS_FILE
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    change(lines[-1])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / record.LAYERS_FILE).unlink(missing_ok=True)
    return run


def test_records_that_disagree_with_themselves_are_one_line(tmp_path, capsys):
    fewer = _damaged(tmp_path, "fewer", lambda d: d.__setitem__("rank_matrix", d["rank_matrix"][:1]))
    _mistake(tmp_path, "analyze", fewer, needles=("intervals.jsonl:2", "rank_matrix has 1 matrices for 2 layers"))
    short = _damaged(tmp_path, "short", lambda d: d["tokens_per_expert"][1].pop())
    _mistake(tmp_path, "compare", short, needles=("tokens_per_expert[1] has 3 counts, num_experts is 4",))
    cases = [
        (["analyze", _damaged(tmp_path, "neg", lambda d: d["tokens_per_expert"][0].__setitem__(0, -5))],
         "field tokens_per_expert[0][0]: input should be greater than or equal to 0"),
        (["analyze", _damaged(tmp_path, "experts", lambda d: d.__setitem__("num_experts", 16))],
         "num_experts is 16"),
        (["analyze", _damaged(tmp_path, "square", lambda d: d["rank_matrix"][0].__setitem__(0, [1, 2, 3]))],
         "rank_matrix[0] is not 2 x 2"),
        (["compare", _damaged(tmp_path, "ep0", lambda d: d.__setitem__("ep_size", 0))], "field ep_size"),
        (["compare", _damaged(tmp_path, "float", lambda d: d["tokens_per_expert"][0].__setitem__(0, 1.5))],
         "input should be an integer"),
        (["compare", _damaged(tmp_path, "steps0", lambda d: d.__setitem__("steps", 0))], "field steps"),
        (["compare", _damaged(tmp_path, "dup", lambda d: d.__setitem__("layers", [1, 1]))], "names a layer twice"),
        (["compare", _damaged(tmp_path, "rows", lambda d: d["per_layer"].pop())], "per_layer has 1 rows"),
        (["compare", _damaged(tmp_path, "escape", lambda d: d.__setitem__("arrays_file", "../../etc/x.npz"))],
         "arrays_file"),
        (["compare", _damaged(tmp_path, "stat", lambda d: d["per_layer"][0].__setitem__("gini", "high"))],
         "per_layer[0].gini"),
    ]
    _mistakes_in_process(capsys, tmp_path, cases)


def test_newer_blocks_in_a_record_are_kept_not_refused(tmp_path):
    run = _damaged(tmp_path, "newer", lambda d: d.update(integrity={"ok": True}, router_health={"dead": 0}))
    assert [r.step for r in record.load_run(run)[1]] == [4, 8]


def test_huge_numbers_are_one_line(tmp_path, capsys):
    huge = _damaged(tmp_path, "huge", lambda d: d["tokens_per_expert"][0].__setitem__(0, 10 ** 40))
    _mistake(tmp_path, "analyze", huge, needles=("less than or equal to 9223372036854775807",))
    dump = _trace_dump(tmp_path / "dump")
    _mistake(tmp_path, "import", dump, "--out", tmp_path / "x", "--hidden-size", "99999999999999999999",
             needles=("--hidden-size",))
    cases = [(["analyze", DATA / "h200_run_mock", "--hidden-size", "9" * 30], "--hidden-size"),
             (["analyze", DATA / "h200_run_mock", "--ep", "9" * 30], "--ep"),
             (["import", dump, "--out", tmp_path / "y", "--num-experts", "9" * 30], "--num-experts"),
             (["import", dump, "--out", tmp_path / "y", "--ep", "0"], "--ep"),
             (["compare", _damaged(tmp_path, "step", lambda d: d.__setitem__("step", 2 ** 70))], "field step")]
    _mistakes_in_process(capsys, tmp_path, cases)


# -- damaged Megatron dumps ----------------------------------------------------------------------

def _dump_with(tmp_path: Path, name: str, last: str) -> Path:
    folder = _trace_dump(tmp_path / name, steps=2)
    with open(folder / "router_trace_rank0.jsonl", "a") as f:
        f.write(last + "\n")
    return folder


def _trace_line(**fields) -> str:
    rec = {"step": 2, "stage": "fwd", "block": "decoder", "layer": 0, "rank": 0, "num_tokens": 2, "topk": 2,
           "top_indices": [[0, 1], [2, 3]]}
    rec.update(fields)
    return json.dumps(rec)


def test_damaged_megatron_dumps_are_one_line_and_write_nothing(tmp_path, capsys):
    _mistake(tmp_path, "import", _dump_with(tmp_path, "step", _trace_line(step="x")), "--out", tmp_path / "o1",
             needles=("router_trace_rank0.jsonl:5", "field step"))
    _mistake(tmp_path, "import", _dump_with(tmp_path, "big", _trace_line(top_indices=[[10 ** 30, 1], [2, 3]])),
             "--out", tmp_path / "o2", needles=("field top_indices[0][0]",))
    tpe = tmp_path / "tpe"
    tpe.mkdir()
    cases = [
        (["import", _dump_with(tmp_path, "str", _trace_line(top_indices=[["a", 1], [2, 3]])), "--out", tmp_path / "o"],
         "field top_indices[0][0]"),
        (["import", _dump_with(tmp_path, "neg", _trace_line(top_indices=[[-1, 1], [2, 3]])), "--out", tmp_path / "o"],
         "greater than or equal to 0"),
        (["import", _dump_with(tmp_path, "topk", _trace_line(topk=0)), "--out", tmp_path / "o"], "field topk"),
        (["import", _dump_with(tmp_path, "list", "[1, 2]"), "--out", tmp_path / "o"], "not an object"),
        (["import", _dump_with(tmp_path, "shape", _trace_line(num_tokens=3)), "--out", tmp_path / "o"],
         "top_indices has shape"),
        (["analyze", _dump_with(tmp_path, "layer", _trace_line(layer=1.5))], "field layer"),
    ]
    (tpe / "rank0.jsonl").write_text(json.dumps({"iter": "x", "layer": 0, "tpe": [[1, 2]]}) + "\n")
    cases.append((["import", tpe, "--out", tmp_path / "o"], "field iter"))
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "router_trace_rank0.jsonl").write_bytes(b'{"step": "\xe9"}\n')
    cases.append((["import", latin, "--out", tmp_path / "o"], "not UTF-8"))
    _mistakes_in_process(capsys, tmp_path, cases)


def test_import_refuses_a_taken_out_folder_before_reading_the_dump(tmp_path):
    run = fake_run(tmp_path / "run")
    _mistake(tmp_path, "import", tmp_path / "no-dump-here", "--out", run, needles=("already holds a run",))


# -- recipe files given by path ------------------------------------------------------------------

def test_recipe_files_are_one_line(tmp_path, capsys):
    (tmp_path / "typo.yaml").write_text("name: x\nparallelizm:\n  ep: 2\n")
    _mistake(tmp_path, "render", tmp_path / "typo.yaml", needles=("field 'parallelizm'", "allowed fields here"))
    (tmp_path / "broken.yaml").write_text("name: x\n  base: [tiny\n: :\n")
    _mistake(tmp_path, "render", tmp_path / "broken.yaml", needles=("not valid YAML", "line 2"))
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "dir.yaml").mkdir()
    _mistakes_in_process(capsys, tmp_path, [
        (["render", tmp_path / "latin1.yaml"], "not UTF-8"),
        (["render", tmp_path / "list.yaml"], "mapping"),
        (["render", tmp_path / "deep.yaml"], "deep"),
        (["train", tmp_path / "typo.yaml", "--dry-run"], "parallelizm"),
    ])


# -- a damaged matrix.json -----------------------------------------------------------------------

def test_a_damaged_matrix_json_is_one_line(tmp_path, capsys):
    def matrix_folder(name, content):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "matrix.json").write_text(content)
        return folder

    argv = ["matrix", "--demo", "--ep", "2", "--dispatcher", "alltoall", "--iters", "2", "--out"]
    _mistake(tmp_path, *argv, matrix_folder("list", "[]"), needles=("matrix.json", "not an object"))
    _mistake(tmp_path, *argv, matrix_folder("nocmd", '{"cells": [{"name": "ep2-alltoall-text", "status": "ok"}]}'),
             needles=("cells[0].command",))
    _mistakes_in_process(capsys, tmp_path, [
        ([*argv, matrix_folder("str", '{"cells": "x"}')], "field cells"),
        ([*argv, matrix_folder("status", '{"cells": [{"name": "a", "status": "great", "command": []}]}')],
         "cells[0].status"),
        ([*argv, matrix_folder("argv", '{"argv": 5}')], "field argv"),
    ])


# -- standard output closed or cut ---------------------------------------------------------------

def test_a_closed_or_cut_stdout_ends_quietly_with_141(tmp_path):
    run = fake_run(tmp_path / "run")
    closed_cases = [["analyze", run], ["render", "--list"]]  # rich tables, plain text
    cut_cases = [["analyze", run, "--json"], ["compare", run],
                 ["recommend", "--ep", "8", "--hardware", "h100", "--assume-installed", "all"]]
    for argv in closed_cases:
        closed = subprocess.run([*CLI, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, timeout=300, env=ENV,
                                preexec_fn=lambda: os.close(1))  # `>&-`
        assert closed.returncode == 141, (argv, closed.returncode, closed.stderr)
        assert "error" not in closed.stderr and "Traceback" not in closed.stderr, (argv, closed.stderr)
    for argv in cut_cases:
        cut = subprocess.Popen([*CLI, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        cut.stdout.close()  # the reader is gone before anything was written: `| head -c 0`
        err = cut.stderr.read().decode()
        assert cut.wait(timeout=300) == 141, (argv, cut.returncode, err)
        assert "error" not in err and "Traceback" not in err, (argv, err)


def test_version_and_exit_codes_are_documented():
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("moe-probe 0.") and "megatron-core" in proc.stdout
    help_text = cli("--help").stdout
    assert "141" in help_text and "exit codes" in help_text
    doc = (Path(__file__).resolve().parents[1] / "docs" / "exit-codes.md").read_text()
    for code in ("0", "1", "2", "130", "141"):
        assert f"| {code} " in doc


# -- settings from the environment ----------------------------------------------------------------

def test_environment_settings_are_checked_before_anything_starts(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _mistake(tmp_path, "demo", "--steps", "2", "--out", out, env={"MOE_PROBE_GROUP_KEYS": "[1, 2]"},
             needles=("$MOE_PROBE_GROUP_KEYS", "JSON list"))
    _mistake(tmp_path, "demo", "--steps", "2", "--out", out, env={"MOE_PROBE_GROUP_KEYS": "{x"},
             needles=("not valid JSON",))
    assert not out.exists()
    failures = []
    for value, needle in (('{"dispatcher": {"a": 1}}', "dispatcher"), ('{"colour": "red"}', "unknown key"),
                          ('"alltoall"', "JSON str")):
        monkeypatch.setenv("MOE_PROBE_GROUP_KEYS", value)
        code, _, err = cli_in_process(capsys, "compare", DATA / "h200_run_mock")
        if code != 2 or needle not in err:
            failures.append((value, code, err))
    assert not failures


def test_the_writing_side_ignores_a_bad_group_keys_variable_with_one_warning(caplog):
    from megatron_moe_probe.grouping import group_keys

    keys = group_keys({"dispatcher": "alltoall"}, environ={"MOE_PROBE_GROUP_KEYS": "[1, 2]"})
    assert keys["dispatcher"] == "alltoall"
    assert "MOE_PROBE_GROUP_KEYS" in caplog.text


# -- build-dataset ---------------------------------------------------------------------------------

def test_build_dataset_mistakes_are_one_line_without_megatrons_notices(tmp_path):
    no_absl = tmp_path / "no_absl" / "absl"
    no_absl.mkdir(parents=True)
    (no_absl / "__init__.py").write_text("raise ImportError('absl is not installed here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(no_absl.parent), ENV["PYTHONPATH"]])}
    text = tmp_path / "in.txt"
    text.write_text("some text\n")
    _mistake(tmp_path, "build-dataset", "--input", text, "--output-prefix", tmp_path / "new" / "ds", "--tokenizer",
             "nope", env=env, needles=("--tokenizer",))
    _mistake(tmp_path, "build-dataset", "--input", tmp_path / "missing.txt", "--output-prefix", tmp_path / "ds",
             env=env, needles=("no such file",))
    _mistake(tmp_path, "build-dataset", "--input", text, "--output-prefix", text / "ds", env=env,
             needles=("is a file",))
    ok = cli("build-dataset", "--input", text, "--output-prefix", tmp_path / "made" / "here" / "ds", env=env)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr  # the docs' example: the folder is created
    assert (tmp_path / "made" / "here" / "ds.bin").is_file()
