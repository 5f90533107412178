"""How integrity and router health appear outside the record: the alarm line and the scalars.

No torch (writers and offline tools import it). The blocks themselves are made on the device
side (`integrity.Verdict.to_dict`, `router_health.summarize`) and travel in the record under
`meta["extras"]["integrity"]` / `meta["extras"]["router_health"]`. A clean interval is
silent: no line, and the violation scalar is 0.

Scalar keys are bounded whatever the number of experts or layers (TRL #6514):
`moe/integrity/{violations,count_calls,payload_calls}` and, for router health,
`moe/all/<stat>_worst_layer` for the statistics summarized across layers (the per-layer
values are ordinary per-layer statistics of the record, `moe/layer_NN/<stat>`).
"""

from __future__ import annotations

from typing import Any, Optional

INTEGRITY = "integrity"
ROUTER_HEALTH = "router_health"
ALERT_TITLE = "moe-probe: dispatch integrity violation"


def extras_of(meta: dict[str, Any]) -> dict[str, Any]:
    return meta.get("extras") or {}


def _size(v: dict) -> str:
    d = v["difference"]
    if isinstance(d, dict):  # a payload fingerprint: how many projections differ, and by how much
        return f"fingerprint differs in {d['projections']}/8 projections (max |diff| {d['max_abs']})"
    return f"sent {v['sent']}, received {v['received']} (difference {d:+d})"


def violation_line(block: Optional[dict], last_iteration: int, iterations: int) -> Optional[str]:
    """One line for the console and the alert, or None for a clean interval."""
    if not block or block.get("ok", True) or block.get("incomplete"):
        return None  # clean, or a rank stopped counting (already warned about): no alarm
    v = block["violations"][0]
    where = f"layer {v['layer']}"
    if v.get("expert") is not None:
        where += f", EP rank {v['rank']}, expert {v['expert']}"
    more = block["violation_count"] - 1
    first = last_iteration - iterations + 1
    return (f"moe-probe: DISPATCH INTEGRITY VIOLATION in iterations {first}-{last_iteration}: {v['check']} at "
            f"{where}: {_size(v)}" + (f" [+{more} more in the record's integrity block]" if more else ""))


def run_summary(reports) -> Optional[dict]:
    """The dispatch integrity of a whole run, from its records (objects with .meta, .step,
    .steps): {"state": "violated" | "unchecked" | "clean", "line": one line to print}, or None
    where no record has the block (the check was off, or the run predates it)."""
    blocks = [(r, extras_of(r.meta).get(INTEGRITY)) for r in reports]
    blocks = [(r, b) for r, b in blocks if b]
    if not blocks:
        return None
    calls = sum(b["count_calls"] for _, b in blocks)
    payload = sum(b["payload_calls"] for _, b in blocks)
    checked = f"{calls:,} forwards count-checked, {payload:,} payload-checked"
    bad = [(r, b) for r, b in blocks if not b.get("ok", True) and not b.get("incomplete")]
    if bad:
        r, b = bad[0]
        first = violation_line(b, int(r.step), int(r.steps)).removeprefix("moe-probe: ")
        return {"state": "violated", "records": len(bad),
                "line": f"{first}; violations in {len(bad)} of {len(blocks)} records ({checked})"}
    unchecked = sorted({u for _, b in blocks for u in b.get("unchecked", [])})
    if unchecked or not calls:
        why = "; ".join(unchecked) or "no forward was checked"
        return {"state": "unchecked", "line": f"dispatch integrity: clean where checked ({checked}); unchecked: {why}"}
    return {"state": "clean", "line": f"dispatch integrity: clean ({checked})"}


def extras_scalars(meta: dict[str, Any], prefix: str = "moe") -> dict[str, float]:
    out: dict[str, float] = {}
    extras = extras_of(meta)
    block = extras.get(INTEGRITY)
    if block:
        out[f"{prefix}/integrity/violations"] = float(block["violation_count"])
        out[f"{prefix}/integrity/count_calls"] = float(block["count_calls"])
        out[f"{prefix}/integrity/payload_calls"] = float(block["payload_calls"])
    health = extras.get(ROUTER_HEALTH)
    if health:
        for stat, summary in health.get("across_layers", {}).items():
            out[f"{prefix}/all/{stat}_worst_layer"] = float(summary["worst_layer"])
    return out
