"""Read what Megatron's training loop prints: per-interval iteration time, TFLOP/s, loss, memory.

The lines parsed (megatron.training.training.training_log, 0.19):
  `iteration 20/ 30 | ... | elapsed time per iteration (ms): 331.9 | throughput per GPU
  (TFLOP/s/GPU): 32.1 | ... | lm loss: 7.668092E+00 | ...`
  `[Rank 0] (after 10 iterations) memory (MB) | allocated: ... | max allocated: 14785.13 | ...`

`moe-probe demo` (CPU, no Megatron training loop) writes the same numbers as JSON lines,
one per iteration, keyed by Megatron's own field names; `read_train_jsonl` reads those.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*(\d+)\s*\|(.*)$")
_FIELD = re.compile(r"\s*([^|:]+?)\s*:\s*([-+0-9.eE]+)\s*(?=\||$)")
_MEMORY = re.compile(r"\[Rank (\d+)\] \(after (\d+) iterations\) memory \(MB\).*?max allocated: ([0-9.]+)")


@dataclass
class TrainLog:
    iterations: list[int] = field(default_factory=list)  # iteration closing each logged interval
    fields: list[dict[str, float]] = field(default_factory=list)  # that interval's numbers
    max_allocated_mb: dict[int, float] = field(default_factory=dict)  # rank -> largest seen

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(it, f[name]) for it, f in zip(self.iterations, self.fields) if name in f]


def parse_train_log(text: str) -> TrainLog:
    out = TrainLog()
    for line in text.splitlines():
        m = _ITERATION.search(line)
        if m:
            values = {k.strip(): float(v) for k, v in _FIELD.findall(m.group(3))}
            if values:
                out.iterations.append(int(m.group(1)))
                out.fields.append(values)
            continue
        m = _MEMORY.search(line)
        if m:
            rank, mb = int(m.group(1)), float(m.group(3))
            out.max_allocated_mb[rank] = max(mb, out.max_allocated_mb.get(rank, 0.0))
    return out


def read_train_log(path: str | Path) -> TrainLog:
    return parse_train_log(Path(path).read_text(errors="replace"))


def read_train_jsonl(path: str | Path) -> TrainLog:
    """A `{"iteration": N, "<Megatron field name>": value, ...}` per line; a cut-short last line is skipped."""
    out = TrainLog()
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        iteration = record.pop("iteration", None)
        values = {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
        if iteration is not None and values:
            out.iterations.append(int(iteration))
            out.fields.append(values)
    return out
