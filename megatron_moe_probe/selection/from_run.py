"""`moe-probe recommend --run RUN`: the question and the measured routing from a recorded run.

A run folder (the probe's own, or a folder of Megatron's dumps that analysis/runs.py reads as a
run) says what the user asked without asking: hardware (meta's GPU names), EP, nodes, precision,
micro-batch, TP, the expert count. The flags given on the command line win over it. Its records
say how the routing behaved: receiver skew and inter-node fraction (the probe's per-layer
statistics), maxvio per iteration with and without per-iteration replication
(analysis/replication.py), drift between the first and last windows, and what the all-to-all
cost model (analysis/a2a_cost.py) predicts for the dispatch at this EP. `reason` turns those
numbers into the lines `recommend` prints next to the card's answer.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.card import Card
from megatron_moe_probe.selection.recommend import Recommendation
from megatron_moe_probe.values import nan_median

# Below this maxvio (busiest rank 10% over the mean) imbalance is second-order: balancing buys
# at most the busiest rank's excess, and the barrier already waits on it (card pitfall
# imbalance-second-order). Our threshold, not a source's.
SECOND_ORDER_MAXVIO = 0.10


def _flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command and command.index(name) + 1 < len(command) else None


def read_run(path: str) -> dict[str, Any]:
    """The question and the routing numbers of a recorded run."""
    from megatron_moe_probe.analysis.replication import replication_section
    from megatron_moe_probe.analysis.runs import load_window

    window = load_window(path)
    meta = window.meta or {}
    command = [str(c) for c in meta.get("command") or []]
    hw = meta.get("hardware") or {}
    gpus = hw.get("gpus") or []
    per_node = window.setting("gpus_per_node")
    world = meta.get("world_size") or hw.get("world_size")
    question: dict[str, Any] = {
        "hardware": gpus[0] if gpus else None,
        "ep": window.ep_size,
        "gpus_per_node": per_node[0] if per_node else None,
        "world": int(world) if world else None,
        "micro_batch": int(_flag(command, "--micro-batch-size")) if _flag(command, "--micro-batch-size") else None,
        "tp": int(_flag(command, "--tensor-model-parallel-size") or 1),
        "precision": "fp8" if _flag(command, "--fp8-format") else "bf16",
        "num_experts": window.num_experts,
        "dispatcher": meta.get("dispatcher"),
    }
    reports = window.reports
    positions = [reports[0].layers.index(n) for n in window.layers]

    def per_layer(stat: str) -> list[float]:
        return [nan_median([r.per_layer[i].get(stat, math.nan) for r in reports]) for i in positions]

    counts = window.iteration_counts()
    basis = "iteration"
    if counts is None:
        counts, basis = window.tokens_per_expert(), "interval"
    replication = replication_section(counts, window.ep_size, 1) if window.ep_size > 1 else None
    routing: dict[str, Any] = {
        "iterations": f"{window.first_step}-{window.last_step}",
        "receiver_skew": nan_median(per_layer("receiver_skew")),
        "inter_node_fraction": nan_median(per_layer("inter_node_fraction")),
        "maxvio_basis": basis,
        "maxvio_static": nan_median([l["maxvio_static"] for l in replication["layers"]]) if replication else 0.0,
        "maxvio_replicated": nan_median([l["maxvio_replicated"] for l in replication["layers"]]) if replication else 0.0,
        "weights_moved_per_iteration": nan_median([l["weights_moved_per_iteration"] for l in replication["layers"]])
        if replication else 0.0,
        "drift": _drift(window),
        "cost": _cost(window),
    }
    return {"path": str(window.path), "question": question, "routing": routing}


def _drift(window) -> float | None:
    """Median over layers of the Jensen-Shannon divergence between the first and the last of
    two windows of the run (None with one interval)."""
    from megatron_moe_probe.analysis.domains import drift_section

    if len(window.reports) < 2:
        return None
    section = drift_section(window, 2)
    last = section["from_first"][-1] if section.get("from_first") else []
    value = nan_median([float(x) for x in last])
    return None if math.isnan(value) else value


def _cost(window) -> dict | None:
    """The cost model's dispatch at the run's EP (layer medians), or why it could not run."""
    from megatron_moe_probe.analysis.run_analysis import AnalysisOptions, _cost_section

    imbalance = [1.0] * len(window.layers)
    try:
        section = _cost_section(window, AnalysisOptions(ep=[window.ep_size]), [window.ep_size], imbalance)
    except UsageError as exc:
        return {"skipped": str(exc)}
    if section.get("skipped"):  # its flags belong to `moe-probe analyze`, not to recommend
        return {"skipped": section["skipped"].replace("; pass ", "; `moe-probe analyze RUN` takes ")}
    rows = [r for r in section["by_ep"] if r["ep"] == window.ep_size]
    row = next((r for r in rows if r["source"] == "measured"), rows[0] if rows else None)
    if row is None:
        return None
    topk = section["settings"]["topk"]["value"]
    return {"source": row["source"], "ep": window.ep_size, "topk": topk,
            "skewed_us": nan_median([x["skewed_us"] for x in row["layers"]]),
            "balanced_us": nan_median([x["balanced_us"] for x in row["layers"]]),
            "penalty": nan_median([x["penalty"] for x in row["layers"]]),
            "fabric": section["fabric"]}


def flex_dedup_factor(ep: int, topk: int) -> float:
    """Expected distinct destination ranks of a token over its top-k assignments, divided by
    k, with the k experts on ranks at random: the share of alltoall's bytes a flex backend
    (DeepEP / HybridEP / NCCL EP, which send a token once per destination rank) moves."""
    if ep <= 1 or topk <= 1:
        return 1.0
    return ep * (1 - (1 - 1 / ep) ** topk) / topk


def reason(card: Card, rec: Recommendation, facts: dict) -> dict:
    """The measured numbers and the lines that reason with them."""
    r, q = facts["routing"], rec.query
    lines = [f"measured over iterations {r['iterations']} at EP={q.ep}: receiver skew (busiest receiver / mean) "
             f"{_f(r['receiver_skew'])}, maxvio per {r['maxvio_basis']} {_f(r['maxvio_static'])}, "
             f"inter-node fraction {_f(r['inter_node_fraction'])}, drift (JS, first vs last half) {_f(r['drift'])}"]
    verdicts: dict[str, Any] = {}
    pit = next((p for p in card.pitfalls if p.id == "imbalance-second-order"), None)
    cite = f" [{pit.source}, {pit.date}, {pit.ref}]" if pit else ""
    if q.ep <= 1:
        verdicts["imbalance"] = "none"
        lines.append("EP=1: no dispatch, routing imbalance costs no communication")
    elif r["maxvio_static"] < SECOND_ORDER_MAXVIO:
        verdicts["imbalance"] = "second-order"
        lines.append(f"imbalance is second-order: the busiest rank is {_pct(r['maxvio_static'])} over the mean "
                     f"(below {_pct(SECOND_ORDER_MAXVIO)}); balancing buys at most that, and ranks already wait on "
                     f"it at the next collective{cite}. Choose the dispatcher on transport, not on balance")
    else:
        verdicts["imbalance"] = "first-order"
        names = ", ".join(d["label"] for d in rec.new_dispatchers if d["id"] in ("moonep", "ultraep")) or \
            "none that fits this query (they need the EP group inside one NVLink domain and BF16)"
        lines.append(f"imbalance is first-order: the busiest rank computes {_pct(r['maxvio_static'])} over the mean; "
                     f"per-iteration replication with one slot per rank would leave {_pct(r['maxvio_replicated'])} "
                     f"and copy {_f(r['weights_moved_per_iteration'])} expert weights per iteration. Replication "
                     f"dispatchers that fit: {names}")
    drift = r["drift"]
    verdicts["relayout"] = ("stale" if drift is not None and drift > 0.05 else "stable" if drift is not None else "unknown")
    if verdicts["imbalance"] == "first-order":
        lines.append("a static relayout (moe-probe analyze: placement) " + (
            f"goes stale: the routing drifts (JS {_f(drift)} > 0.05), so per-iteration replication fits better"
            if verdicts["relayout"] == "stale" else
            "holds while the routing is this stable; it pays once the busiest rank's saving times the iterations "
            "until the next relayout exceeds the expert bytes moved (analysis/replication.relayout_decision)"))
    if not math.isnan(r["inter_node_fraction"]) and r["inter_node_fraction"] > 0.5:
        lines.append(f"{_pct(r['inter_node_fraction'])} of dispatched tokens cross nodes: the inter-node fabric decides"
                     + ("" if q.interconnect else " (give --interconnect: the EFA A/Bs rank the backends by it)"))
    cost = r["cost"]
    predictions = []
    if cost and "skipped" not in cost:
        factor = flex_dedup_factor(q.ep, cost["topk"])
        for c in rec.candidates:
            flex = card.backend(c.backend).dispatcher_type == "flex"
            us = cost["skewed_us"] * (factor if flex else 1.0)
            predictions.append({"backend": c.backend, "dispatch_us": us, "bytes_share": factor if flex else 1.0})
        lines.append(f"a2a cost model at EP={q.ep} ({cost['source']} matrix): balanced {_f(cost['balanced_us'])} us, "
                     f"this routing {_f(cost['skewed_us'])} us per dispatch (x{_f(cost['penalty'])}); "
                     + "; ".join(f"{card.backend(p['backend']).label} ~{_f(p['dispatch_us'])} us" for p in predictions)
                     + f" (flex backends send a token once per destination rank: x{_f(factor)} of the bytes if its "
                       f"{cost['topk']} experts land on random ranks; kernels and overlap are not modelled: the A/B decides)")
    elif cost:
        lines.append(f"a2a cost model skipped: {cost['skipped']}")
    return {"path": facts["path"], "question": facts["question"], "routing": r, "verdicts": verdicts,
            "predictions": predictions, "reasoning": lines}


def _f(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"
