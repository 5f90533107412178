"""The typed form of a matrix folder's matrix.json (offline/matrix.py writes it, and reads it back
when the same matrix is run again into its folder to resume)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, ValidationError

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record.problems import describe


class ManifestCell(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: StrictStr
    command: list[StrictStr]
    status: Literal["pending", "running", "ok", "failed", "interrupted"]
    exit_code: StrictInt | None = None
    seconds: StrictFloat | StrictInt | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    argv: list[StrictStr] = []
    cells: list[ManifestCell] = []


def parse_manifest(data: Any, path: Path) -> dict:
    """matrix.json's content checked by type (UsageError naming the file and field), as plain data."""
    hint = "; move it away to start this matrix afresh"
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a matrix manifest (a JSON {type(data).__name__}, not an object){hint}")
    try:
        Manifest.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{path}: {describe(exc)}{hint}") from None
    return data
