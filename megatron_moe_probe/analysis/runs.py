"""A window of a recorded run: the interval reports to analyse, as tensors, plus the model
settings the cost model needs, looked up in meta.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from megatron_moe_probe import stats
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record import IntervalReport
from megatron_moe_probe.record import load_arrays
from megatron_moe_probe.record.names import step_summary_name
from megatron_moe_probe.record.run_meta import settings_of


@dataclass(frozen=True)
class RunWindow:
    """Consecutive interval reports of one run with one configuration (E, EP, layers)."""

    path: Path
    meta: dict[str, Any]
    reports: list[IntervalReport]
    layers: list[int]  # global layer numbers analysed (a subset of the reports' layers)
    num_experts: int
    ep_size: int

    def _layer_positions(self) -> list[int]:
        return [self.reports[0].layers.index(n) for n in self.layers]

    def tokens_per_expert(self) -> torch.Tensor:
        """[interval, layer, expert] counts (int64)."""
        pos = self._layer_positions()
        return torch.tensor([[r.tokens_per_expert[i] for i in pos] for r in self.reports], dtype=torch.int64)

    @property
    def has_rank_matrix(self) -> bool:
        """False for runs imported from a dump that does not record sources (tokens per expert)."""
        return all(r.rank_matrix for r in self.reports)

    def rank_matrix(self) -> torch.Tensor:
        """[interval, layer, src EP rank, dst EP rank] counts (int64)."""
        pos = self._layer_positions()
        return torch.tensor([[r.rank_matrix[i] for i in pos] for r in self.reports], dtype=torch.int64)

    def _arrays(self, name: str) -> list[torch.Tensor] | None:
        """The array `name` of every interval of the window, restricted to the window's layers
        (layer axis 1 for per-iteration arrays and per-domain arrays alike); None when any
        interval lacks it."""
        out = []
        for r in self.reports:
            arrays = r.arrays or load_arrays(self.path, r)  # in memory for a dump read as a run
            if name not in arrays:
                return None
            layers = [int(n) for n in arrays["layers"]]
            a = torch.from_numpy(arrays[name])
            out.append(a[:, [layers.index(n) for n in self.layers]])
        return out

    def iteration_counts(self) -> torch.Tensor | None:
        """[iteration, layer, expert] counts of every iteration of the window (int64), from the
        per-iteration records; None when the run has none (or history was folded)."""
        if any(r.meta.get("history_folded") for r in self.reports):
            return None
        parts = self._arrays("tokens_per_expert")
        return None if parts is None else torch.cat(parts)

    def iteration_rank_matrix(self) -> torch.Tensor | None:
        """[iteration, layer, src, dst] (recorded with --moe-probe-iterations matrix), or None."""
        parts = self._arrays("rank_matrix")
        return None if parts is None else torch.cat(parts)

    def domain_counts(self) -> tuple[list[str], torch.Tensor] | None:
        """(domain names, [interval, domain, layer, expert] counts), or None without domains."""
        names = self.reports[0].domains
        if not names or any(r.domains != names for r in self.reports):
            return None
        parts = self._arrays("domain_tokens_per_expert")
        return None if parts is None else (list(names), torch.stack(parts))

    def step_mean(self, stat: str) -> list[float]:
        """Per layer: the mean over every iteration of the window of a per-step statistic the
        probe recorded (`<stat>_step_mean`, weighted by each interval's iterations); NaN when
        the records lack it."""
        out = []
        for i in self._layer_positions():
            pairs = [(r.steps, r.per_layer[i].get(step_summary_name(stat, "step_mean"), math.nan)) for r in self.reports]
            pairs = [(n, v) for n, v in pairs if v is not None and not math.isnan(v)]
            weight = sum(n for n, _ in pairs)
            out.append(sum(n * v for n, v in pairs) / weight if weight else math.nan)
        return out

    @property
    def first_step(self) -> int:
        """First training iteration the window covers."""
        return self.reports[0].step - self.reports[0].steps + 1

    @property
    def last_step(self) -> int:
        return self.reports[-1].step

    def describe_steps(self) -> str:
        count = len(self.reports)
        return f"iterations {self.first_step}-{self.last_step} ({count} interval{'s' if count > 1 else ''})"

    def halves(self) -> tuple["RunWindow", "RunWindow | None"]:
        """(first half, second half) of the intervals, for fitting on one and testing on the
        other; the second is None when there is a single interval."""
        cut = len(self.reports) // 2
        if cut == 0:
            return self, None
        return replace(self, reports=self.reports[:cut]), replace(self, reports=self.reports[cut:])

    def setting(self, name: str) -> tuple[Any, str] | None:
        """(value, where it came from) of a model setting (see SETTINGS), or None if unknown."""
        if name in ("topk", "gpus_per_node"):  # the probe records both
            value = self.reports[-1].meta.get(name, (self.meta.get("probe") or {}).get(name))
            if value is not None:
                return int(value), "run records"
        if name == "bytes_per_element":
            return _activation_bytes(self.meta)
        return _meta_setting(self.meta, name)


# Per-layer statistics compared between layers and runs (all from stats.py).
IMBALANCE_STATS = ("max_over_mean", "gini", "entropy")


def layer_imbalance(window: RunWindow) -> dict[str, dict[str, list[float]]]:
    """Per statistic, per layer: on the window's summed counts ("window") and the mean of the
    per-iteration values the probe recorded ("step"; NaN when not recorded). Summing over
    iterations smooths imbalance; the per-iteration value is what makes a GPU wait."""
    counts = window.tokens_per_expert().sum(0)
    return {name: {"window": stats.EXPERT_STATS[name][0](counts).tolist(), "step": window.step_mean(name)}
            for name in IMBALANCE_STATS}


# Model settings the analyses look up: fields of the run's typed settings (record/run_meta.py).
SETTINGS = ("hidden_size", "topk", "micro_batch_size", "global_batch_size", "seq_length", "tensor_parallel",
            "context_parallel", "gpus_per_node")
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _meta_setting(meta: dict[str, Any], name: str) -> tuple[int, str] | None:
    settings, sources = settings_of(meta)
    value = getattr(settings, name)
    return None if value is None else (int(value), sources.get(name, "meta settings"))


def _activation_bytes(meta: dict[str, Any]) -> tuple[int, str] | None:
    """Bytes per activation element the dispatcher moves: 2 with --bf16/--fp16, 4 when the
    recorded configuration has neither (Megatron then trains in fp32), None if unknown."""
    settings, sources = settings_of(meta)
    if settings.precision is None:
        return None
    return _BYTES[settings.precision], sources.get("precision", "meta settings")


def parse_steps(text: str | None) -> tuple[int | None, int | None]:
    """'START:END' (either side may be empty) -> (start, end)."""
    if not text:
        return None, None
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start.strip() else None, int(end) if end.strip() else None)
    except ValueError:
        raise UsageError(f"--steps wants START:END (iteration numbers, either may be empty), got {text!r}") from None


def load_window(path: str | Path, steps: str | None = None, layers: list[int] | None = None) -> RunWindow:
    """The intervals of a run folder whose closing iteration is within `steps` ('START:END',
    inclusive), restricted to `layers` (global layer numbers; None = all)."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"not a run folder: {path}")
    from megatron_moe_probe import megatron_dumps

    # A folder of Megatron's own dumps (RouterTracer, tokens per expert) reads as a run too.
    meta, reports = megatron_dumps.load_run_or_dump(path)
    if not reports:
        raise UsageError(f"{path}: no probe reports in its intervals.jsonl")
    start, end = parse_steps(steps)
    kept = [r for r in reports if (start is None or r.step >= start) and (end is None or r.step <= end)]
    if not kept:
        raise UsageError(f"{path}: no interval closes within --steps {steps} "
                         f"(intervals close at {', '.join(str(r.step) for r in reports)})")
    first = kept[0]
    for r in kept[1:]:
        if (r.num_experts, r.ep_size, r.layers) != (first.num_experts, first.ep_size, first.layers):
            raise UsageError(f"{path}: the run changes experts, EP or layers at iteration {r.step}; "
                             "choose a --steps range with one configuration")
    chosen = list(first.layers) if layers is None else layers
    missing = [n for n in chosen if n not in first.layers]
    if missing:
        raise UsageError(f"{path}: no layer {', '.join(map(str, missing))} "
                         f"(its MoE layers: {', '.join(map(str, first.layers))})")
    return RunWindow(path, meta, kept, chosen, first.num_experts, first.ep_size)
