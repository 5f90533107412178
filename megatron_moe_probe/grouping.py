"""The keys runs are grouped and compared by, and the per-layer summary of a run.

Where they live: `make_writers` resolves them once and puts them in the run meta under
"group", so they are in meta.json (`group`) and in the wandb config (`moe_probe.group`, in the
UI `moe_probe.group.dispatcher`, ...); the wandb run's group is `group`. Runs written before
this existed get them computed from their meta when read back.

The group name comes from `$WANDB_RUN_GROUP` (wandb's own variable, so Megatron's own
`wandb.init` on the GPU path lands in the same group), which `moe-probe matrix --wandb` sets to
its --group; `$MOE_PROBE_GROUP_KEYS` (JSON, set by matrix from each cell's parameters)
overrides keys read from the meta.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

from megatron_moe_probe.environment import GROUP_ENV, KEYS_ENV, KEYS, group_keys_from_environment
from megatron_moe_probe.record.names import SUMMARY_STATS
from megatron_moe_probe.record.run_meta import settings_of

__all__ = ["GROUP_ENV", "KEYS_ENV", "KEYS", "SUMMARY_STATS", "group_keys", "summary_rows"]


def _hardware(meta: dict[str, Any]) -> str | None:
    hw = meta.get("hardware") if isinstance(meta.get("hardware"), dict) else {}
    gpus = hw.get("gpus")
    if gpus:
        return f"{len(gpus)}x{gpus[0]}" if len(set(gpus)) == 1 else ",".join(gpus)
    return "cpu" if "gpus" in hw or meta.get("job") == "demo" else None


def group_keys(meta: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The grouping keys of a run, from its meta (and, on the writing side, the environment)."""
    env = os.environ if environ is None else environ
    settings, _ = settings_of(meta)
    dispatcher = meta.get("dispatcher") or settings.dispatcher
    if isinstance(dispatcher, list):
        dispatcher = ",".join(dispatcher)
    recipe = meta.get("recipe")
    keys: dict[str, Any] = {
        "group": None,
        "dispatcher": dispatcher,
        "backend": settings.flex_backend if dispatcher == "flex" else None,
        "ep": settings.expert_parallel or meta.get("world_size"),
        "tp": settings.tensor_parallel,
        "hardware": _hardware(meta),
        "recipe": recipe if isinstance(recipe, str) else (recipe or {}).get("name"),
        "data": meta.get("data"),
    }
    if isinstance(meta.get("group"), dict):  # already resolved (a meta written with its keys)
        keys.update({k: v for k, v in meta["group"].items() if v is not None})
    if env.get(GROUP_ENV):
        keys["group"] = env[GROUP_ENV]
    keys.update(group_keys_from_environment(env))
    return keys


def summary_rows(reports: list) -> list[dict[str, Any]]:
    """One row per layer: the median of each statistic over the reports (NaN-free)."""
    by_layer: dict[int, dict[str, list[float]]] = {}
    for report in reports:
        for layer, row in zip(report.layers, report.per_layer):
            values = by_layer.setdefault(layer, {})
            for name in SUMMARY_STATS:
                v = row.get(name)
                if isinstance(v, (int, float)) and not math.isnan(v):
                    values.setdefault(name, []).append(float(v))
    return [{"layer": layer, **{name: statistics.median(values[name]) if values.get(name) else None
                                for name in SUMMARY_STATS}}
            for layer, values in sorted(by_layer.items())]
