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
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{what} {path}: not valid YAML: {exc}") from None


def package_data(*parts: str) -> Path:
    """A file or folder under megatron_moe_probe/resources/ (a plain path: wheels install unzipped)."""
    return Path(str(resources.files("megatron_moe_probe").joinpath("resources", *parts)))
