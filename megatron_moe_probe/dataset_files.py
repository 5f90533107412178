"""Megatron indexed datasets as files (PREFIX.bin + PREFIX.idx), checked without importing
Megatron or torch: planners (`matrix`, `train`) check a prefix before anything starts."""

from __future__ import annotations

import os

from megatron_moe_probe.errors import UsageError


def require_dataset(prefix: str, flag: str, hint: str) -> None:
    """A clear UsageError unless PREFIX.bin and PREFIX.idx both exist (Megatron's own error comes
    only after the workers have started)."""
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        raise UsageError(f"{flag} {prefix}: no {prefix}.bin / {prefix}.idx ({hint})")
