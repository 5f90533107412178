"""The typed interval record: what a line of intervals.jsonl must be before anything reads it.

Types, bounds (counts are non-negative int64) and the rules between fields (one per-layer row,
one count per expert and one EP x EP matrix per layer) live here, so a damaged record is one
line naming the file, the line and the field, never an error deep in an analysis. Blocks this
reader does not know (a newer writer's `integrity`, `router_health`, ...) are kept, not refused.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator

from megatron_moe_probe.record.names import ITERATIONS_DIR
from megatron_moe_probe.record.problems import describe
from megatron_moe_probe.record.report import IntervalReport

INT64_MAX = (1 << 63) - 1
MAX_LAYERS = 100_000
MAX_EXPERTS = 1 << 20

Count = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
Step = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
Number = StrictInt | StrictFloat | None


class IntervalRecord(BaseModel):
    """One line of intervals.jsonl, as `record.encode_report` writes it."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    step: Step
    steps: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)]
    time: StrictInt | StrictFloat
    layers: list[Annotated[StrictInt, Field(ge=0, le=MAX_LAYERS)]]
    num_experts: Annotated[StrictInt, Field(ge=1, le=MAX_EXPERTS)]
    ep_size: Annotated[StrictInt, Field(ge=1, le=MAX_EXPERTS)]
    per_layer: list[dict[str, Number]]
    tokens_per_expert: list[list[Count]]
    rank_matrix: list[list[list[Count]]]
    dropped_per_expert: list[list[Count]] = []
    meta: dict[str, Any] = {}
    kind: StrictStr = "interval"
    schema_version: StrictInt = Field(default=1, alias="schema")
    domains: list[StrictStr] = []
    arrays_file: StrictStr = ""

    @model_validator(mode="after")
    def _agree(self) -> "IntervalRecord":
        n_layers, experts, ep = len(self.layers), self.num_experts, self.ep_size
        if len(set(self.layers)) != n_layers:
            raise ValueError(f"layers {self.layers} names a layer twice")
        if len(self.per_layer) != n_layers:
            raise ValueError(f"per_layer has {len(self.per_layer)} rows for {n_layers} layers")
        for name in ("tokens_per_expert", "dropped_per_expert"):
            rows = getattr(self, name)
            if not rows:
                continue
            if len(rows) != n_layers:
                raise ValueError(f"{name} has {len(rows)} rows for {n_layers} layers")
            for i, row in enumerate(rows):
                if len(row) != experts:
                    raise ValueError(f"{name}[{i}] has {len(row)} counts, num_experts is {experts}")
        if self.rank_matrix:
            if len(self.rank_matrix) != n_layers:
                raise ValueError(f"rank_matrix has {len(self.rank_matrix)} matrices for {n_layers} layers")
            for i, matrix in enumerate(self.rank_matrix):
                if len(matrix) != ep or any(len(row) != ep for row in matrix):
                    raise ValueError(f"rank_matrix[{i}] is not {ep} x {ep} (ep_size {ep})")
        if self.arrays_file and (not self.arrays_file.startswith(ITERATIONS_DIR + "/") or ".." in self.arrays_file):
            raise ValueError(f"arrays_file {self.arrays_file!r} is not a file of the run's {ITERATIONS_DIR}/ folder")
        return self


def decode_report(data: Any) -> IntervalReport:
    """An IntervalReport from one parsed line of intervals.jsonl (ValueError naming the field
    when it is not a valid record); null per-layer values become NaN again."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    try:
        IntervalRecord.model_validate(data)
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None
    per_layer = [{k: (math.nan if v is None else v) for k, v in row.items()} for row in data["per_layer"]]
    return IntervalReport.from_dict({**data, "per_layer": per_layer})
