"""`IntervalReport`: what one log interval of the probe says, as plain Python data."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from megatron_moe_probe.record.names import SCHEMA_VERSION


@dataclass
class IntervalReport:
    """One log interval as plain Python data. `summarize.build_report` makes it from the probe's
    Snapshot; writers only ever see this (no tensors; it serializes to JSON as is).
    Read back, every record has passed the typed model of record/schema.py."""

    step: int  # training iteration that closed the interval
    steps: int  # iterations folded into this interval
    time: float  # unix time at the flush
    layers: list[int]  # global layer number (1-based, as Megatron counts) of each MoE layer reported
    num_experts: int
    ep_size: int
    # One dict per entry of `layers`: statistic name -> number (NaN where undefined).
    per_layer: list[dict[str, float]]
    # Interval-summed counts, [layer][expert] and [layer][src EP rank][dst EP rank].
    tokens_per_expert: list[list[int]]
    rank_matrix: list[list[list[int]]]
    # Tokens dropped by the capacity factor, [layer][expert]; empty when no capacity is set.
    dropped_per_expert: list[list[int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "interval"
    schema: int = SCHEMA_VERSION
    # Names of the domains (datasets of a blend) of `arrays["domain_tokens_per_expert"]`.
    domains: list[str] = field(default_factory=list)
    # The per-interval array file in the run folder (ITERATIONS_DIR/...npz), "" when none.
    arrays_file: str = ""
    # Integer arrays written to `arrays_file` by the local writer, never into the JSON line
    # (numpy arrays; see ARRAY_NAMES). Empty after reading a run: use `load_arrays`.
    arrays: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(replace(self, arrays={})).items() if k != "arrays"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IntervalReport":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def layer_names(self) -> list[str]:
        return [f"layer_{n:02d}" for n in self.layers]

    def scalars(self, prefix: str = "moe") -> dict[str, float]:
        """Flat `prefix/layer_NN/stat` series for TensorBoard/wandb, plus `prefix/all/stat`
        aggregates over layers (mean over layers, and the worst layer for imbalance)."""
        out: dict[str, float] = {}
        columns: dict[str, list[float]] = {}
        for name, row in zip(self.layer_names(), self.per_layer):
            for stat, value in row.items():
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                out[f"{prefix}/{name}/{stat}"] = float(value)
                columns.setdefault(stat, []).append(float(value))
        for stat, values in columns.items():
            out[f"{prefix}/all/{stat}_layer_mean"] = sum(values) / len(values)
            out[f"{prefix}/all/{stat}_layer_max"] = max(values)
        from megatron_moe_probe.integrity_report import extras_scalars  # integrity / router-health keys

        out.update(extras_scalars(self.meta, prefix))
        return out
