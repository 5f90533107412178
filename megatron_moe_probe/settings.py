"""The probe's settings as one typed object, and the one place its flags are spelled.

`ProbeSettings` is what a training run's probe does (interval, writers, folder, timing,
topology, history). Megatron's parser learns the flags from megatron/flags.py, recipes
render them and `moe-probe matrix` passes them, all through `FLAGS` and `probe_flags`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# ProbeSettings field (or "enabled") -> its Megatron command-line flag.
FLAGS = {
    "enabled": "--moe-probe",
    "interval": "--moe-probe-interval",
    "out_dir": "--moe-probe-dir",
    "writers": "--moe-probe-writers",
    "timing": "--moe-probe-timing",
    "gpus_per_node": "--moe-probe-gpus-per-node",
    "history": "--moe-probe-history",
    "heatmap_every": "--moe-probe-heatmap-every",
}
DEFAULT_HEATMAP_EVERY = 10
TIMING_MODES = ("all", "forward")  # --moe-probe-timing alone means "all"


def dest(field: str) -> str:
    """The attribute argparse stores a flag under (`--moe-probe-dir` -> `moe_probe_dir`)."""
    return FLAGS[field][2:].replace("-", "_")


@dataclass(frozen=True)
class ProbeSettings:
    interval: int
    writers: list[str]
    out_dir: str
    timing: str | None  # None (off), "all" (forward and backward) or "forward"
    gpus_per_node: int | None  # None: LOCAL_WORLD_SIZE
    history: int  # per-step counts kept per interval
    heatmap_every: int = DEFAULT_HEATMAP_EVERY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_flags(**values: Any) -> list[str]:
    """`--moe-probe` plus a flag for each given setting (FLAGS keys): True gives the flag alone,
    a list is comma-joined, None and False leave the flag out."""
    out = [FLAGS["enabled"]]
    for field, value in values.items():
        if value is None or value is False:
            continue
        if value is True:
            out.append(FLAGS[field])
        else:
            out += [FLAGS[field], ",".join(value) if isinstance(value, (list, tuple)) else str(value)]
    return out
