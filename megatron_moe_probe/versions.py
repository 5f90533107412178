"""Version numbers of installed distributions: the one parser, and what a run records."""

from __future__ import annotations

import ast
import importlib.util
import os
from importlib import metadata


def version_tuple(text: str) -> tuple[int, ...]:
    """(0, 19, 2) from "0.19.2", "0.19.2rc1", "0.19.2+cu128": the leading numbers, up to the
    first part that is not all digits (whose own leading digits still count)."""
    out = []
    for part in text.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():
            break
    return tuple(out)


def version_at_least(text: str | None, minimum: str) -> bool:
    if text is None:
        return False
    a, b = version_tuple(text), version_tuple(minimum)
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)) >= b + (0,) * (n - len(b))


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None



def _package_info_version() -> str | None:
    """The version in megatron/core/package_info.py of the `megatron` that would import, read as
    text (importing megatron.core pulls in torch and most of Megatron)."""
    spec = importlib.util.find_spec("megatron")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "core", "package_info.py")
        if not os.path.isfile(path):
            continue
        parts: dict[str, object] = {}
        for node in ast.parse(open(path, encoding="utf-8").read()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE"):
                        parts[target.id] = node.value.value
        if {"MAJOR", "MINOR", "PATCH"} <= parts.keys():
            return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}{parts.get('PRE_RELEASE') or ''}"
    return None


def megatron_core_version() -> str | None:
    """The version of the Megatron that imports: its package_info.py (a source checkout has no
    distribution metadata, or a stale one from a wheel installed beside it), else the
    megatron-core distribution's."""
    return _package_info_version() or installed_version("megatron-core")
