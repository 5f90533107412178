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
    "timing_every": "--moe-probe-timing-every",
    "integrity": "--moe-probe-integrity",
    "integrity_payload_every": "--moe-probe-integrity-payload-every",
    "gpus_per_node": "--moe-probe-gpus-per-node",
    "history": "--moe-probe-history",
    "heatmap_every": "--moe-probe-heatmap-every",
    "iterations": "--moe-probe-iterations",
    "domains": "--moe-probe-domains",
}
DEFAULT_HEATMAP_EVERY = 10
# --moe-probe-timing alone means "forward": backward timing costs two autograd tensor hooks per
# wrapped call and mostly measures the same collectives again.
TIMING_MODES = ("forward", "all")
DEFAULT_TIMING_EVERY = 8  # dispatcher timing samples one iteration in N (the first of each interval, then every N-th)
MAX_HISTORY = 1000  # per-step counts kept per interval, at most (bounds memory on long intervals)
# Dispatch integrity checks (docs/metrics.md): off, warn (a loud line, scalar, alert) or fail (also stop training).
INTEGRITY_MODES = ("off", "warn", "fail")
DEFAULT_INTEGRITY = "warn"
# The payload fingerprint is off unless asked for: on one H100 it cost 11.8 ms of GPU time per MoE
# layer forward at the Qwen3-30B-A3B shape (32,768 bf16 rows of 2,048), 27x that layer's expert
# GEMMs (benchmarks/integrity_cost.py micro, docs/performance.md). N > 0 checks one iteration in N.
DEFAULT_INTEGRITY_PAYLOAD_EVERY = 0
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
    timing: str | None  # None (off), "forward" or "all" (forward and backward)
    gpus_per_node: int | None  # None: LOCAL_WORLD_SIZE
    history: int  # per-step counts kept per interval
    heatmap_every: int = DEFAULT_HEATMAP_EVERY
    iterations: str = DEFAULT_ITERATIONS  # one of ITERATION_MODES
    domains: str | None = None  # None: one domain per dataset of a blend; "off"; or a mapping (resolve_domains)
    timing_every: int = DEFAULT_TIMING_EVERY  # time one iteration in N
    integrity: str = DEFAULT_INTEGRITY  # one of INTEGRITY_MODES
    integrity_payload_every: int = DEFAULT_INTEGRITY_PAYLOAD_EVERY  # 0: counts only; N: payload one iteration in N

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def create(cls, interval: int, *, writers: list[str] | None = None, out_dir: str = "moe_probe_runs",
               timing: str | bool | None = None, gpus_per_node: int | None = None, history: int | None = None,
               heatmap_every: int = DEFAULT_HEATMAP_EVERY, iterations: str = DEFAULT_ITERATIONS,
               domains: str | None = None, timing_every: int = DEFAULT_TIMING_EVERY,
               integrity: str = DEFAULT_INTEGRITY,
               integrity_payload_every: int = DEFAULT_INTEGRITY_PAYLOAD_EVERY) -> "ProbeSettings":
        """Settings with every default filled in the one way (the flags, the Bridge callback and
        the demo all come through here). `timing`: None/False off, True or "forward", "all".
        Raises ValueError naming the bad value."""
        if timing is True:
            timing = TIMING_MODES[0]
        if timing is False:
            timing = None
        if timing is not None and timing not in TIMING_MODES:
            raise ValueError(f"timing must be off (None), {' or '.join(map(repr, TIMING_MODES))}, got {timing!r}")
        if integrity not in INTEGRITY_MODES:
            raise ValueError(f"integrity must be one of {', '.join(INTEGRITY_MODES)}, got {integrity!r}")
        if not isinstance(integrity_payload_every, int) or integrity_payload_every < 0:
            raise ValueError(f"integrity_payload_every must be 0 (off) or a positive integer, got {integrity_payload_every!r}")
        if iterations not in ITERATION_MODES:
            raise ValueError(f"iterations must be one of {', '.join(ITERATION_MODES)}, got {iterations!r}")
        for name, value in (("interval", interval), ("heatmap_every", heatmap_every), ("timing_every", timing_every),
                            ("history", history or 1), ("gpus_per_node", gpus_per_node or 1)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return cls(interval=interval, writers=list(writers or ["local"]), out_dir=out_dir, timing=timing,
                   gpus_per_node=gpus_per_node, history=min(history or interval, MAX_HISTORY),
                   heatmap_every=heatmap_every, iterations=iterations, domains=domains, timing_every=timing_every,
                   integrity=integrity, integrity_payload_every=integrity_payload_every)


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
