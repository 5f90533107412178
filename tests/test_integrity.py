"""Dispatch integrity: faults injected into Megatron's real token exchange are caught, in the
interval where they happen and naming the layer; clean layouts never alarm.

The rank jobs (integrity_jobs.py) run the CPU harness's GPTModel over gloo; a fault wraps the
dispatcher's `token_dispatch` / `token_combine` (the calls that move rows between ranks) on
one rank and one layer, for the first forward of the interval.
"""

import pytest
import torch

import integrity_jobs as ij
from helpers import cli
from megatron_moe_probe import integrity, integrity_report
from megatron_moe_probe.cpu.cluster import TinyMoEConfig, run_ranks

BASE = TinyMoEConfig()


# ---- the fingerprint and the segment sums, on plain tensors -------------------------------------

def test_fingerprint_is_exact_and_sees_every_single_bit():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 24, generator=g).to(torch.bfloat16)
    base = integrity.row_fingerprints(rows)
    # the int8 GEMM path (m > 16) and the float64 path (m <= 16) give the same integers
    assert torch.equal(base[:8].long(), integrity.row_fingerprints(rows[:8]).long())
    bits = rows.view(torch.int16)
    for col in range(24):
        for bit in range(16):
            flipped = bits.clone()
            flipped[3, col] ^= (1 << bit) if bit < 15 else -(1 << 15)
            changed = integrity.row_fingerprints(flipped.view(torch.bfloat16)).long()
            assert (changed[3] != base[3].long()).all(), (col, bit)  # all 8 projections move
            assert torch.equal(changed[:3], base[:3].long())


def test_segment_sums_match_a_loop_and_clamp_bad_counts():
    values = torch.arange(30, dtype=torch.int32).view(10, 3)
    counts = torch.tensor([2, 0, 5, 3])
    sums = integrity.segment_sums(values, counts)
    starts = [0, 2, 2, 7]
    for i, (s, c) in enumerate(zip(starts, counts.tolist())):
        assert torch.equal(sums[i], values[s:s + c].long().sum(0))
    too_many = integrity.segment_sums(values, torch.tensor([8, 8]))  # more rows claimed than exist
    assert torch.equal(too_many[1], values[8:].long().sum(0))


def test_order_independent_but_misroute_and_duplicate_change_the_sums():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(32, 16, generator=g).to(torch.bfloat16)
    counts = torch.tensor([10, 22])
    sent = integrity.segment_sums(integrity.row_fingerprints(rows), counts)
    shuffled = torch.cat([rows[:10].flip(0), rows[10:][torch.randperm(22, generator=g)]])
    assert torch.equal(integrity.segment_sums(integrity.row_fingerprints(shuffled), counts), sent)
    swapped = rows.clone()
    swapped[0], swapped[31] = rows[31], rows[0]
    assert not torch.equal(integrity.segment_sums(integrity.row_fingerprints(swapped), counts), sent)
    duplicated = rows.clone()
    duplicated[1] = rows[0]
    assert not torch.equal(integrity.segment_sums(integrity.row_fingerprints(duplicated), counts), sent)


# ---- the real dispatchers over gloo ----------------------------------------------------------

FAULT_CASES = [None] + [(phase, fault, slot, rank) for phase, slot, rank in (("dispatch", 0, 1), ("combine", 1, 0))
                        for fault in ij.FAULTS] + [("dispatch", "count", 1, 1)]


def _assert_caught(verdict, case, checks):
    phase, fault, slot, rank = case
    assert not verdict["ok"], case
    layers = {v["layer"] for v in verdict["violations"]}
    assert layers == {slot + 1}, (case, verdict["violations"])
    assert {v["check"] for v in verdict["violations"]} <= set(checks), (case, verdict["violations"])
    return verdict["violations"]


def test_alltoall_faults_are_caught_naming_layer_and_rank():
    results = run_ranks(ij.faults, 2, BASE, FAULT_CASES, 1)
    for verdicts in results:  # every rank reaches the same verdict
        assert verdicts == results[0]
    verdicts = results[0]
    clean = verdicts[None]
    assert clean["ok"] and clean["violations"] == [] and clean["stops"] == []
    assert integrity_report.violation_line(clean, 1, 1) is None
    assert integrity_report.extras_scalars({"extras": {"integrity": clean}})["moe/integrity/violations"] == 0
    assert clean["count_calls"] == 2 * BASE.num_layers and clean["payload_calls"] == clean["count_calls"]
    for case in FAULT_CASES[1:]:
        phase, fault, slot, rank = case
        if fault == "count":
            found = _assert_caught(verdicts[case], case, ("dispatch_count", "dispatch_payload"))
            counts = [v for v in found if v["check"] == "dispatch_count"]
            assert sorted(v["difference"] for v in counts) == [-1, 1]
            assert {v["rank"] for v in counts} == {rank}
        elif phase == "dispatch":
            found = _assert_caught(verdicts[case], case, ("dispatch_payload",))
            assert {v["rank"] for v in found} == {rank}  # the receiving rank owns the experts
        else:
            _assert_caught(verdicts[case], case, ("combine_payload",))
        # loud: one line naming the iteration window and the layer, a scalar, a stop request on every rank
        line = integrity_report.violation_line(verdicts[case], 1, 1)
        assert line.startswith("moe-probe: DISPATCH INTEGRITY VIOLATION in iterations 1-1: ")
        assert f"layer {slot + 1}" in line and "\n" not in line
        assert all(len(r[case]["stops"]) == 1 and r[case]["stops"][0].startswith(line) for r in results)
        scalars = integrity_report.extras_scalars({"extras": {"integrity": verdicts[case]}})
        assert scalars["moe/integrity/violations"] == verdicts[case]["violation_count"] > 0


def test_allgather_dispatch_faults_are_caught():
    cfg = BASE.with_(dispatcher="allgather")
    cases = [None, ("dispatch", "misroute", 0, 0), ("dispatch", "bitflip", 1, 1)]
    verdicts = run_ranks(ij.faults, 2, cfg, cases, 1)[0]
    assert verdicts[None]["ok"] and verdicts[None]["count_calls"] == 2 * cfg.num_layers
    for case in cases[1:]:
        _assert_caught(verdicts[case], case, ("dispatch_payload",))


def _assert_clean(results, layers: int, ranks: int):
    for per_rank in results:
        for key, (first, second) in per_rank.items():
            for verdict in (first, second):
                assert verdict["ok"], (key, verdict["violations"])
            assert first["count_calls"] == ranks * layers * 2 == first["payload_calls"], key
            # second interval: 3 iterations x 2 micro-batches, payload on iterations 2 and 4 of the run
            assert second["count_calls"] == ranks * layers * 6, key
            assert second["payload_calls"] == ranks * layers * 2 * 2, key
            assert second["payload_every"] == 2


def test_clean_two_rank_layouts_never_alarm():
    variants = {
        "capacity_drop": {"capacity_factor": 0.5, "aux_loss_coeff": 0.0},
        "capacity_pad": {"capacity_factor": 0.5, "pad_to_capacity": True, "aux_loss_coeff": 0.0},
        "recompute": {"recompute": True},
        "allgather": {"dispatcher": "allgather"},
        "one_local_expert": {"num_experts": 2},
    }
    _assert_clean(run_ranks(ij.clean_variants, 2, BASE, variants), BASE.num_layers, 2)


@pytest.mark.parametrize("cfg", [BASE.with_(ep=4), BASE.with_(tp=2, ep=2, sequence_parallel=True)],
                         ids=["ep4", "tp2xep2_sp"])
def test_clean_four_rank_layouts_never_alarm(cfg):
    _assert_clean(run_ranks(ij.clean_variants, 4, cfg, {"plain": {}}), cfg.num_layers, 4)


def test_session_fail_mode_stops_at_the_interval_that_saw_the_fault(tmp_path):
    """Through open_session (the path install(), the Bridge callback and the demo share): the
    record of the faulty interval carries the violation, the one before it is clean, the loop
    stops at that interval's last iteration on every rank, one rank logs one line; router
    health's per-layer statistics are in the record's per-layer rows."""
    from megatron_moe_probe.record import load_run

    out = tmp_path / "run"
    # the payload check samples iterations 1, 9, 17, ... (every 8): the bit flip is in iteration 9
    results = run_ranks(ij.session_with_fault, 2, BASE, str(out), 16, 4, 9)
    assert [r["iterations"] for r in results] == [12, 12]  # flushed (and stopped) at the end of its interval
    assert all(r["stop"] and "layer 2" in r["stop"] for r in results)
    logged = [e for r in results for e in r["errors"] if "DISPATCH INTEGRITY VIOLATION" in e]
    assert len(logged) == 1 and "iterations 9-12" in logged[0] and "layer 2" in logged[0]
    _meta, reports = load_run(out)
    assert [r.step for r in reports] == [4, 8, 12]
    first, _, last = (r.meta["extras"]["integrity"] for r in reports)
    assert first["ok"] and first["count_calls"] == 2 * 4 * BASE.num_layers
    assert first["payload_every"] == 8 and first["payload_calls"] == 2 * 1 * BASE.num_layers
    assert not last["ok"] and {v["layer"] for v in last["violations"]} == {2}
    assert reports[2].scalars()["moe/integrity/violations"] == last["violation_count"]
    assert reports[0].scalars()["moe/integrity/violations"] == 0
    for report in reports:
        for row in report.per_layer:
            assert row["maxvio"] == pytest.approx(row["max_over_mean"] - 1)
            assert row["tpe_max"] == max(report.tokens_per_expert[report.per_layer.index(row)])
        assert "moe/all/maxvio_worst_layer" in report.scalars()
    # Read back later, the run says so where users look: `analyze` and `compare` (subprocesses).
    analyzed = cli("analyze", str(out), "--ep", "2")
    assert analyzed.returncode == 0, analyzed.stderr
    text = " ".join(analyzed.stdout.split())  # folded at the terminal's 80 columns
    line = text[text.index("DISPATCH INTEGRITY VIOLATION"):]
    assert line.startswith("DISPATCH INTEGRITY VIOLATION in iterations 9-12: dispatch_payload at layer 2")
    assert "violations in 1 of 3 records" in line
    compared = cli("compare", str(out), str(out))
    assert compared.returncode == 0, compared.stderr
    assert "integrity violation" in compared.stdout  # the status column
    assert " ".join(compared.stdout.split()).count("DISPATCH INTEGRITY VIOLATION in iterations 9-12") == 2


def test_run_summary_states_by_hand():
    """One line per run from its records: violated beats unchecked beats clean; none without blocks."""
    from helpers import make_report

    def run(*blocks):
        reports = []
        for i, block in enumerate(blocks):
            r = make_report(4 * (i + 1), steps=4)
            if block is not None:
                r.meta["extras"] = {"integrity": block}
            reports.append(r)
        return reports

    def block(calls, violations=(), unchecked=()):
        return {"ok": not violations, "count_calls": calls, "payload_calls": 0, "payload_every": 0,
                "violation_count": len(violations), "violations": list(violations), "unchecked": list(unchecked),
                "checked_layers": [1, 2]}

    assert integrity_report.run_summary(run(None, None)) is None
    clean = integrity_report.run_summary(run(block(8), block(8)))
    assert clean["state"] == "clean" and "16 forwards count-checked" in clean["line"]
    graphs = integrity_report.run_summary(run(block(8), block(0, unchecked=["layers 1,2: dispatch captured in a CUDA graph"])))
    assert graphs["state"] == "unchecked" and "layers 1,2: dispatch captured" in graphs["line"]
    bad = {"check": "dispatch_count", "layer": 2, "expert": 3, "rank": 1, "sent": 10, "received": 9, "difference": -1}
    violated = integrity_report.run_summary(run(block(8), block(8, [bad]), block(8, [bad])))
    assert violated["state"] == "violated" and violated["records"] == 2
    assert "iterations 5-8" in violated["line"] and "layer 2, EP rank 1, expert 3" in violated["line"]
    assert "2 of 3 records" in violated["line"]


def test_checks_add_no_host_sync_or_collective():
    """The default session's integrity check and router health: no host sync, no collective
    until the flush; on an unsampled iteration only the count check's few kernels (a routing-map
    sum and adds) beyond the counting path; the flush adds a float64 all-reduce."""
    import megatron_jobs as jobs

    results = run_ranks(ij.checks_audit, 2, BASE)
    for res in results:
        for name in ("sampled", "unsampled"):
            ops = res[name]["ops"]
            added = {op for op, n in ops.items() if n > res["ops_off"].get(op, 0)}
            # `_to_copy` is left out: on CPU a device->host copy and a same-device dtype cast look
            # alike, and the hooks' only ones are casts (logits to float, scores to float64)
            assert not (added & (jobs.SYNC_OPS - {"_to_copy"})), (name, added)
            assert res[name]["collectives"] == res["collectives_off"], name
        extra = {op: n - res["ops_counting"].get(op, 0) for op, n in res["unsampled"]["ops"].items()
                 if n != res["ops_counting"].get(op, 0) and op not in jobs.VIEW_OPS}
        # per MoE layer: routing-map sum + add (sent), tokens_per_expert copy + add (received); per step:
        # the counting path's copy_/zero_ of step()
        layers = BASE.num_layers
        assert extra.get("sum", 0) == layers and extra.get("add_", 0) == 2 * layers, extra
        assert res["flush_collectives"] == {"all_reduce": 2}  # one per dtype: int64 and float64
        assert res["integrity"]["ok"] and res["integrity"]["count_calls"] == 2 * 2 * layers
