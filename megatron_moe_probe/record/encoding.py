"""Plain JSON data from anything a run records (NaN and infinities become null)."""

from __future__ import annotations

import math
import os
from typing import Any


def to_json_safe(obj: Any) -> Any:
    """Plain JSON data from `obj`: non-finite floats become None, tuples lists, numpy
    scalars Python numbers, paths strings, anything else its str()."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    item = getattr(obj, "item", None)  # 0-d numpy arrays / numpy and torch scalars, without importing either
    shape = getattr(obj, "shape", None)
    if callable(item) and shape is not None and len(tuple(shape)) == 0:
        try:
            return to_json_safe(item())
        except Exception:  # noqa: BLE001 - fall back to the text form
            pass
    return str(obj)
