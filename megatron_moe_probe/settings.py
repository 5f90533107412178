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
    "iterations": "--moe-probe-iterations",
    "domains": "--moe-probe-domains",
}
DEFAULT_HEATMAP_EVERY = 10
TIMING_MODES = ("all", "forward")  # --moe-probe-timing alone means "all"
# Per-iteration records: off, each iteration's [layer, expert] counts (default), or also its rank matrix.
ITERATION_MODES = ("off", "counts", "matrix")
DEFAULT_ITERATIONS = "counts"


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
    iterations: str = DEFAULT_ITERATIONS  # one of ITERATION_MODES
    domains: str | None = None  # None: one domain per dataset of a blend; "off"; or a mapping (resolve_domains)

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


def resolve_domains(prefixes: list[str] | None, spec: str | None) -> tuple[list[str], list[int]]:
    """(domain names, domain index of each dataset of the blend) for `--moe-probe-domains`.

    prefixes: the blend's dataset prefixes in order (Megatron's `--data-path`, weights removed),
    None or one prefix: no blend, no domains. spec:
      None / "auto"          one domain per dataset, named by the prefix's file name
      "off"                  no domains
      "NAME,NAME,..."        a name per dataset, in blend order (a name may repeat: datasets merge)
      "KEY=NAME,..."         KEY is a prefix or its file name; datasets not named keep their file name
    Raises ValueError with a message naming the problem."""
    if spec == "off" or not prefixes or len(prefixes) < 2:
        if spec not in (None, "auto", "off") and (not prefixes or len(prefixes) < 2):
            raise ValueError(f"--moe-probe-domains {spec}: the run does not train on a blend of datasets "
                             "(--data-path W1 PREFIX1 W2 PREFIX2 ...)")
        return [], []
    base = [p.rstrip("/").rsplit("/", 1)[-1] for p in prefixes]
    if spec in (None, "auto"):
        per_dataset = base
    else:
        items = [x.strip() for x in spec.split(",") if x.strip()]
        if all("=" in x for x in items):
            mapping = dict(x.split("=", 1) for x in items)
            unknown = [k for k in mapping if k not in prefixes and k not in base]
            if unknown:
                raise ValueError(f"--moe-probe-domains: {', '.join(unknown)} is not a dataset of the blend "
                                 f"({', '.join(base)})")
            per_dataset = [mapping.get(p, mapping.get(b, b)) for p, b in zip(prefixes, base)]
        elif any("=" in x for x in items):
            raise ValueError("--moe-probe-domains: give either NAME,NAME,... or KEY=NAME,..., not both")
        elif len(items) != len(prefixes):
            raise ValueError(f"--moe-probe-domains: {len(items)} names for {len(prefixes)} datasets")
        else:
            per_dataset = items
    names = list(dict.fromkeys(per_dataset))
    return names, [names.index(n) for n in per_dataset]
