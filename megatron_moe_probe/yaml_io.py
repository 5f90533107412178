"""Reading the project's YAML data files (recipes, the skill card) with one kind of error."""

from __future__ import annotations

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
