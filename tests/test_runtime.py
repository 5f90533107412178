"""Runtime proof: which dispatcher and flex backend the live MoE layers ran, and compare's use of it.

alltoall and allgather are checked on real Megatron-Core MoE layers over gloo (CPU). The
flex branch cannot run on CPU (MoEFlexTokenDispatcher.__init__ builds CUDA tensors and
needs DeepEP/HybridEP), so it is checked on Megatron's own classes instantiated without
their __init__: the object has the class and the `_comm_manager` attribute that
MoEFlexTokenDispatcher.__init__ sets (megatron-core 0.19.2 token_dispatcher.py).
"""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import pytest

import megatron_jobs as jobs
from megatron_moe_probe.offline.compare import compare
from megatron_moe_probe.cpu.cluster import TinyMoEConfig, run_ranks
from megatron_moe_probe.megatron.runtime import dispatcher_runtime, requested_backend

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("dispatcher,cls", [("alltoall", "MoEAlltoAllTokenDispatcher"),
                                            ("allgather", "MoEAllGatherTokenDispatcher")])
def test_snapshot_records_what_each_layer_ran(dispatcher, cls):
    cfg = TinyMoEConfig(dispatcher=dispatcher)
    results = run_ranks(jobs.probe_vs_dispatcher, 2, cfg, 1)
    records = results[0]["snapshot"].meta["runtime_dispatchers"]
    assert [r["layer"] for r in records] == results[0]["snapshot"].layers  # one per MoE layer
    for r in records:
        assert r["dispatcher_class"] == cls and r["backend"] == dispatcher
        assert r["flex_manager"] is None and r["num_sms"] is None


def _flex(manager_cls_name: str, num_sms):
    from megatron.core.transformer.moe import token_dispatcher as td

    d = object.__new__(td.MoEFlexTokenDispatcher)
    d._comm_manager = object.__new__(getattr(td, manager_cls_name))
    d.config = types.SimpleNamespace(moe_flex_dispatcher_num_sms=num_sms)
    return d


@pytest.mark.parametrize("manager,backend", [("_DeepepManager", "deepep"), ("_HybridEPManager", "hybridep"),
                                             ("_NCCLEPManager", "ncclep")])
def test_flex_backend_is_read_from_the_comm_manager(manager, backend):
    r = dispatcher_runtime(_flex(manager, 32))
    assert r["dispatcher_class"] == "MoEFlexTokenDispatcher" and r["flex_manager"] == manager
    assert r["backend"] == backend and r["num_sms"] == 32


def test_flex_without_a_known_manager_is_not_a_backend():
    d = _flex("_DeepepManager", None)
    d._comm_manager = object()  # whatever a future or patched Megatron put there
    r = dispatcher_runtime(d)
    assert r["backend"] is None and r["flex_manager"] == "object"


def test_requested_backend_from_meta():
    assert requested_backend({"args": {"moe_token_dispatcher_type": "flex", "moe_flex_dispatcher_backend": "hybridep"}}) == "hybridep"
    assert requested_backend({"args": {"moe_token_dispatcher_type": "alltoall"}}) == "alltoall"
    assert requested_backend({"dispatcher": "allgather"}) == "allgather"  # the CPU demo's meta


def _run_with_runtime(tmp_path, name, requested: dict, ran: str) -> Path:
    run = tmp_path / name
    shutil.copytree(DATA / "h200_run_mock", run)
    meta = json.loads((run / "meta.json").read_text())
    meta["args"].update(requested)
    (run / "meta.json").write_text(json.dumps(meta))
    lines = []
    for line in (run / "intervals.jsonl").read_text().splitlines():
        rep = json.loads(line)
        rep["meta"]["runtime_dispatchers"] = [
            {"layer": n, "dispatcher_class": "MoEAlltoAllTokenDispatcher" if ran == "alltoall" else "MoEFlexTokenDispatcher",
             "backend": ran, "flex_manager": None if ran == "alltoall" else "_HybridEPManager", "num_sms": None}
            for n in rep["layers"]]
        lines.append(json.dumps(rep))
    (run / "intervals.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_compare_marks_a_backend_that_did_not_run_as_environment_limit(tmp_path, capsys):
    ok = _run_with_runtime(tmp_path, "a2a", {"moe_token_dispatcher_type": "alltoall"}, "alltoall")
    fell_back = _run_with_runtime(tmp_path, "hybridep", {"moe_token_dispatcher_type": "flex",
                                                         "moe_flex_dispatcher_backend": "hybridep"}, "alltoall")
    rows = compare([ok, fell_back], {}, warmup=10)
    assert rows[0]["status"] == "ok" and rows[0]["ran"] == "alltoall" and not math.isnan(rows[0]["ms_per_iter"])
    bad = rows[1]
    assert bad["status"] == "environment limit" and bad["environment_limit"] == "requested hybridep, ran alltoall"
    assert math.isnan(bad["ms_per_iter"]) and math.isnan(bad["loss_delta_vs_first"])  # not performance data
    assert bad["not_performance_data"]["ms_per_iter"] == rows[0]["ms_per_iter"]  # kept, out of the comparison
    # the table says so too
    from megatron_moe_probe.commands.compare import print_table

    print_table(rows)
    assert "ENVIRONMENT LIMIT (requested hybridep, ran alltoall)" in capsys.readouterr().out


def test_compare_without_runtime_record_says_so():
    row = compare([DATA / "h200_run_mock"], {}, warmup=10)[0]
    assert row["runtime_proof"] == "none recorded" and row["status"] == "ok"
