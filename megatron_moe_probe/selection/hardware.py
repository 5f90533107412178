"""GPU model / GPUs-per-node / NVLink-domain detection for `moe-probe recommend --hardware auto`.

Order: NVML through `pynvml` if importable, else `nvidia-smi --query-gpu=name
--format=csv,noheader`, else give up and say so (the caller then asks for
`--hardware`). Both probes are injectable for tests.

The NVLink domain is not something one node can measure reliably: for HGX systems
(H100/H200/B200) it is the GPUs of the node (8); for GB200/GB300 NVL72 it is the
72-GPU rack, which the card records per hardware id. `--nvlink-domain` overrides.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.card import Card


@dataclass(frozen=True)
class Detected:
    gpu_names: tuple[str, ...]   # one entry per visible GPU
    method: str                  # 'pynvml', 'nvidia-smi' or 'none'
    detail: str                  # what was tried

    @property
    def ok(self) -> bool:
        return bool(self.gpu_names)


def _via_pynvml(importer: Callable[[str], object]) -> tuple[str, ...]:
    nvml = importer("pynvml")
    nvml.nvmlInit()
    try:
        n = nvml.nvmlDeviceGetCount()
        names = []
        for i in range(n):
            name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return tuple(names)
    finally:
        nvml.nvmlShutdown()


def _via_nvidia_smi(run: Callable[..., subprocess.CompletedProcess], which: Callable[[str], str | None]) -> tuple[str, ...]:
    exe = which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("nvidia-smi not on PATH")
    proc = run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"nvidia-smi exited {proc.returncode}: {proc.stderr.strip()[:200]}")
    return tuple(line.strip() for line in proc.stdout.splitlines() if line.strip())


def detect_gpus(
    importer: Callable[[str], object] | None = None,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    which: Callable[[str], str | None] = shutil.which,
) -> Detected:
    import importlib

    importer = importer or importlib.import_module
    tried = []
    try:
        names = _via_pynvml(importer)
        if names:
            return Detected(names, "pynvml", "NVML via pynvml")
        tried.append("pynvml: no GPUs")
    except Exception as exc:
        tried.append(f"pynvml: {type(exc).__name__}: {exc}")
    try:
        names = _via_nvidia_smi(run, which)
        if names:
            return Detected(names, "nvidia-smi", "nvidia-smi --query-gpu=name")
        tried.append("nvidia-smi: no GPUs listed")
    except Exception as exc:
        tried.append(f"nvidia-smi: {type(exc).__name__}: {exc}")
    return Detected((), "none", "; ".join(tried))


@dataclass(frozen=True)
class Topology:
    hardware: str                # card hardware id
    gpus_per_node: int | None
    nodes: int
    nvlink_domain: int | None
    hardware_source: str         # 'flag' or the detection method
    notes: tuple[str, ...] = ()


def resolve_topology(
    card: Card,
    hardware: str,
    gpus_per_node: int | None,
    nodes: int | None,
    nvlink_domain: int | None = None,
    detector: Callable[[], Detected] = detect_gpus,
) -> Topology:
    """Turn the CLI's hardware/topology flags into card terms, detecting what is 'auto'."""
    notes: list[str] = []
    detected: Detected | None = None
    if hardware.lower() == "auto":
        detected = detector()
        if not detected.ok:
            raise UsageError(
                "cannot detect the GPU model on this machine (" + detected.detail + "); "
                f"pass --hardware ({', '.join(card.hardware_ids)})"
            )
        models = {_resolve_or_unknown(card, n) for n in detected.gpu_names}
        if len(models) > 1:
            raise UsageError(f"this node mixes GPU models {sorted(set(detected.gpu_names))}; pass --hardware")
        hw = models.pop()
        if hw == "unknown":
            notes.append(f"detected GPU {detected.gpu_names[0]!r} is not in the card; treated as 'unknown'")
        source = detected.method
    else:
        hw = card.resolve_hardware(hardware)
        source = "flag"
    entry = card.hardware_entry(hw)
    if gpus_per_node is None:
        if detected is not None and detected.ok:
            gpus_per_node = len(detected.gpu_names)
            notes.append(f"GPUs per node: {gpus_per_node} (detected via {detected.method})")
        elif entry.gpus_per_node is not None:
            gpus_per_node = entry.gpus_per_node
            notes.append(f"GPUs per node: {gpus_per_node} (card default for {hw}; pass --gpus-per-node to change)")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise UsageError(f"--gpus-per-node must be >= 1 (got {gpus_per_node})")
    if nodes is not None and nodes < 1:
        raise UsageError(f"--nodes must be >= 1 (got {nodes})")
    if nvlink_domain is None:
        if entry.nvl72:
            nvlink_domain = entry.nvlink_domain
            notes.append(f"NVLink domain: {nvlink_domain} GPUs ({hw} NVL72 rack, from the card)")
        elif gpus_per_node is not None:
            nvlink_domain = gpus_per_node if entry.nvlink_domain is None else min(gpus_per_node, entry.nvlink_domain)
            notes.append(f"NVLink domain: {nvlink_domain} GPUs (one node)")
    elif nvlink_domain < 1:
        raise UsageError(f"--nvlink-domain must be >= 1 (got {nvlink_domain})")
    return Topology(hw, gpus_per_node, nodes or 1, nvlink_domain, source, tuple(notes))


def _resolve_or_unknown(card: Card, name: str) -> str:
    try:
        return card.resolve_hardware(name)
    except UsageError:
        return "unknown"
