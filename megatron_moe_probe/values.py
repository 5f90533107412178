"""Plain-Python numbers where None or NaN means "missing": the checks, the median and the
"-" that tables print for them. No torch: offline tools and writers share these."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

MISSING = "-"


def is_missing(value: Any) -> bool:
    """None or a NaN number. Text (a run name, a dispatcher) is never missing."""
    if value is None:
        return True
    if isinstance(value, str):
        return False
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def nan_median(values: Iterable[Any]) -> float:
    """Median of the values that are not missing; NaN when none is."""
    kept = [float(v) for v in values if not is_missing(v)]
    return statistics.median(kept) if kept else math.nan


def format_or_dash(value: Any, spec: str = ".3f") -> str:
    """`format(value, spec)`, or "-" for a missing value."""
    return MISSING if is_missing(value) else format(value, spec)
