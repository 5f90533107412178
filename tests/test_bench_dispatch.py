"""`moe-probe bench-dispatch` on CPU: recorded routing replayed exactly through Megatron's real
alltoall and allgather dispatchers over gloo, outputs checked; clear errors for bad runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import cli
from megatron_moe_probe.analysis import routing_replay as rr
from megatron_moe_probe.errors import UsageError


def _cli(*argv, timeout=240):
    return cli(*argv, timeout=timeout)


def test_routing_map_matches_counts_exactly():
    counts = [30, 10, 20, 4, 0, 0, 0, 0]
    m = rr.routing_map(counts, tokens=32, topk=2, seed=3)
    assert m.sum(0).tolist() == counts
    assert set(m.sum(1).tolist()) == {2}
    assert rr.worst_counts(8, 2, 64, 2, hot_rank=1) == [0, 0, 0, 0, 32, 32, 32, 32]
    assert rr.worst_counts(8, 4, 10, 3)[:2] == [10, 10] and sum(rr.worst_counts(8, 4, 10, 3)) == 30
    assert sum(rr.balanced_counts(8, 33, 2)) == 66
    scaled = rr.scale_counts([100, 1, 1, 1], 20, 10)
    assert sum(scaled) == 20 and max(scaled) == 10
    with pytest.raises(UsageError):
        rr.routing_map([3, 3], tokens=2, topk=2)


def _trace_dump(folder: Path, steps=2, tokens=16, topk=2, experts=4, seed=0):
    import random

    rnd = random.Random(seed)
    folder.mkdir()
    for rank in range(2):
        with open(folder / f"router_trace_rank{rank}.jsonl", "w") as f:
            for step in range(1, steps + 1):
                for layer in (1, 2):
                    # skewed: expert 0 in every token's top-k
                    idx = [[0, rnd.randrange(1, experts)] for _ in range(tokens)]
                    f.write(json.dumps({"step": step, "stage": 0, "block": "decoder", "layer": layer - 1, "rank": rank,
                                        "num_tokens": tokens, "topk": topk, "top_indices": idx}) + "\n")


def test_bench_dispatch_on_demo_run_and_dump(tmp_path):
    run = tmp_path / "demo"
    r = _cli("demo", "--steps", 1, "--interval", 1, "--quiet", "--out", run)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "bench.json"
    r = _cli("bench-dispatch", run, "--ranks", 2, "--max-recorded", 2, "--json", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "timings on CPU are not reported" in r.stdout
    assert "environment limit: flex-deepep, flex-hybridep need CUDA" in r.stdout
    res = json.loads(out.read_text())
    recorded = [s for s in res["scenarios"] if s["name"] == "recorded"]
    assert len(recorded) == 2 and {s["name"] for s in res["scenarios"]} == {"recorded", "balanced", "worst"}
    # The demo's records hold one dispatch each: replayed counts are the recorded ones, exactly,
    # and the dispatchers handed their experts exactly those counts.
    _, reports = __import__("megatron_moe_probe.record", fromlist=["load_run"]).load_run(run)
    last = reports[-1]
    assert recorded[-1]["counts"] == last.tokens_per_expert[-1] and recorded[-1]["exact"]
    assert {r["dispatcher"] for r in res["rows"]} == {"alltoall", "allgather"}
    assert all(r["counts_match"] for r in res["rows"])
    assert all(r["max_abs_error"] < 1e-5 for r in res["rows"])
    assert len(res["alltoall_vs_allgather"]) == 4 and max(res["alltoall_vs_allgather"]) < 1e-5
    assert not any("ms" in r for r in res["rows"])  # never timed on CPU

    dump = tmp_path / "trace"
    _trace_dump(dump)
    r = _cli("bench-dispatch", dump, "--ranks", 2, "--dispatchers", "alltoall,allgather", "--hidden-size", 32,
             "--max-recorded", 1, "--json", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    sc = res["scenarios"][0]
    assert res["geometry"]["tokens_per_rank"] == 16 and res["geometry"]["topk"] == 2
    assert sc["exact"] and sc["counts"][0] == 32 and sum(sc["counts"]) == 64  # per iteration, exact
    assert all(r["counts_match"] and r["max_abs_error"] < 1e-5 for r in res["rows"])


def test_missing_or_malformed_run_is_a_one_line_error(tmp_path):
    r = _cli("bench-dispatch", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such run folder" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "intervals.jsonl").write_text("{not json\n")
    (bad / "meta.json").write_text("{}")
    r = _cli("bench-dispatch", bad)
    errors = [line for line in r.stderr.splitlines() if line.startswith("moe-probe bench-dispatch: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "no probe reports" in errors[0], r.stderr
