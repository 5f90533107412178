"""The availability gate: which dispatcher backends can actually be built here.

Mirrors how Megatron-Core 0.19 itself decides (megatron/core/transformer/moe/fused_a2a.py):

    DeepEP   : from deep_ep import Buffer; from deep_ep.utils import EventHandle, EventOverlap
    HybridEP : from deep_ep import HybridEPBuffer
    NCCL EP  : from transformer_engine.pytorch import ep
    permute fusion (--moe-permute-fusion): transformer_engine importable, version >= 2.1.0
               (megatron/core/utils.py get_te_version: te.__version__, else the
               'transformer-engine' distribution's version)

The requirements come from the card (`backends[].requires`); the import function is
injectable so tests (and `--assume-installed`) can simulate installed/missing packages.
A failed import is an environment limitation, never performance data (seed).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Callable, Iterable

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.card import BACKEND_IDS, Card
from megatron_moe_probe.versions import version_at_least

Importer = Callable[[str], object]


@dataclass(frozen=True)
class BackendStatus:
    backend: str
    available: bool
    detail: str                      # what was tried and what happened
    version: str | None = None       # version of the providing distribution, when known

    def to_dict(self) -> dict:
        return {"backend": self.backend, "available": self.available, "detail": self.detail, "version": self.version}


@dataclass(frozen=True)
class Availability:
    backends: dict[str, BackendStatus]
    te_version: str | None
    permute_fusion: bool
    permute_fusion_detail: str
    source: str = "probed"           # 'probed' (this machine) or 'assumed' (--assume-installed)
    extra: dict = field(default_factory=dict)

    def is_available(self, backend: str) -> bool:
        return self.backends[backend].available

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "backends": {k: v.to_dict() for k, v in self.backends.items()},
            "transformer_engine_version": self.te_version,
            "permute_fusion": self.permute_fusion,
            "permute_fusion_detail": self.permute_fusion_detail,
        }


def _dist_version(names: Iterable[str], version_of: Callable[[str], str]) -> str | None:
    for n in names:
        try:
            return version_of(n)
        except Exception:  # PackageNotFoundError and friends
            continue
    return None


def detect_backends(
    card: Card,
    importer: Importer = importlib.import_module,
    version_of: Callable[[str], str] = importlib.metadata.version,
) -> Availability:
    """Try the same imports Megatron tries. Any exception counts as 'not available'."""
    statuses: dict[str, BackendStatus] = {}
    for b in card.backends:
        ok, notes = True, []
        for req in b.requires:
            what = f"from {req.module} import {', '.join(req.attrs)}" if req.attrs else f"import {req.module}"
            try:
                mod = importer(req.module)
                missing = [a for a in req.attrs if not hasattr(mod, a)]
                if missing:
                    ok = False
                    notes.append(f"{what}: module has no {', '.join(missing)}")
                else:
                    notes.append(f"{what}: ok")
            except Exception as exc:  # ImportError, but also OSError/RuntimeError from CUDA libs
                ok = False
                notes.append(f"{what}: {type(exc).__name__}: {exc}")
        ver = None
        if b.requires:
            dists = {r.distribution for r in b.requires}
            ver = _dist_version([d for n in dists for d in (n, n.replace("_", "-"))], version_of)
        detail = "; ".join(notes) if notes else "built into megatron-core"
        if not ok and b.import_error:
            detail += f" -> Megatron would raise: {b.import_error}"
        statuses[b.id] = BackendStatus(b.id, ok, detail, ver)

    te_version = None
    te_detail = ""
    try:
        te = importer("transformer_engine")
        te_version = getattr(te, "__version__", None) or _dist_version(["transformer-engine", "transformer_engine"], version_of)
    except Exception as exc:
        te_detail = f"import transformer_engine: {type(exc).__name__}: {exc}"
    need = card.permute_fusion.requires.min_version
    fusion = version_at_least(te_version, need)
    if fusion:
        te_detail = f"transformer_engine {te_version} >= {need}"
    elif te_version is not None:
        te_detail = f"transformer_engine {te_version} < {need}"
    return Availability(statuses, te_version, fusion, te_detail or f"transformer_engine not importable (needs >= {need})")


def parse_backend_list(text: str) -> set[str]:
    items = {t.strip().lower() for t in text.split(",") if t.strip()}
    if items == {"all"}:
        return set(BACKEND_IDS) | {"permute-fusion"}
    if items == {"none"}:
        return set()
    allowed = set(BACKEND_IDS) | {"permute-fusion"}
    bad = items - allowed
    if bad:
        raise UsageError(
            f"unknown backend(s) {', '.join(sorted(bad))} in --assume-installed; allowed: all, none, {', '.join(sorted(allowed))}"
        )
    return items


def assumed(card: Card, installed: set[str]) -> Availability:
    """An availability gate stating what the *target* container has (planning from another machine).

    Backends without requirements (alltoall, allgather) are always available.
    """
    statuses = {}
    for b in card.backends:
        ok = not b.requires or b.id in installed
        statuses[b.id] = BackendStatus(b.id, ok, "assumed installed" if ok and b.requires else ("built into megatron-core" if not b.requires else "assumed missing"))
    fusion = "permute-fusion" in installed
    return Availability(
        statuses,
        None,
        fusion,
        "assumed: transformer_engine >= %s" % card.permute_fusion.requires.min_version if fusion else "assumed: no transformer_engine >= %s" % card.permute_fusion.requires.min_version,
        source="assumed",
    )


def availability_for(card: Card, assume_installed: str | None) -> Availability:
    """What `--assume-installed` says the target has, else what this machine has: the one
    reading of that flag for recommend, render and matrix."""
    return detect_backends(card) if assume_installed is None else assumed(card, parse_backend_list(assume_installed))
