"""The project's YAML data files (recipes, the skill card): where they are, and reading them
with one kind of error.

They are package data under megatron_moe_probe/resources/, found through importlib.resources,
so an installed wheel has them as well as a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from megatron_moe_probe.errors import UsageError


def read_yaml(path: Path, what: str) -> Any:
    """Parsed YAML of `path`; a syntax error becomes a UsageError naming `what` and the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{what} {path}: not valid YAML: {_one_line(exc)}") from None
    except RecursionError:
        raise UsageError(f"{what} {path}: nested too deeply to be a {what}") from None


def _one_line(exc: Exception) -> str:
    """PyYAML's message without its multi-line excerpt of the file: the problem and where."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def package_data(*parts: str) -> Path:
    """A file or folder under megatron_moe_probe/resources/ (a plain path: wheels install unzipped)."""
    return Path(str(resources.files("megatron_moe_probe").joinpath("resources", *parts)))
