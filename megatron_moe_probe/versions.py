"""Version numbers of installed distributions: the one parser, and what a run records."""

from __future__ import annotations

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

