"""One line from a typed model's refusal: the file, the field and what was expected.

Every boundary (records, meta.json, matrix.json, dump lines, recipe files, environment
variables) parses into a pydantic model; `describe` turns its ValidationError into the one
line the CLI prints (errors.UsageError subclasses carry it to exit 2)."""

from __future__ import annotations

from typing import Any

from megatron_moe_probe.errors import UsageError


class CorruptRunError(UsageError, ValueError):
    """A run folder that cannot be read (corruption other than a cut-short last line)."""


def field_path(loc: tuple[Any, ...]) -> str:
    """('tokens_per_expert', 1, 0) -> 'tokens_per_expert[1][0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before", "function-plain") or "[" in str(part):
            continue  # pydantic's names for validators and union members, not fields
        else:
            out += ("." if out else "") + str(part)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe(exc: Any) -> str:
    """'field hardware: expected an object, got 'H100'' from a pydantic ValidationError
    (its first error; the count of the others when there are more)."""
    errors = exc.errors(include_url=False)
    if not errors:
        return str(exc)
    first = errors[0]
    where = field_path(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    if first.get("type") not in ("value_error", "missing") and "input" in first:
        message += f", got {_short(first['input'])}"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"field {where}: {message}" if where else message) + more
