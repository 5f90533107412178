"""One line from a typed model's refusal: the file, the field and what was expected.

Every boundary (records, meta.json, matrix.json, dump lines, recipe files, environment
variables) parses into a pydantic model; `describe` turns its ValidationError into the one
line the CLI prints (errors.UsageError subclasses carry it to exit 2)."""

from __future__ import annotations

import re
from typing import Any

from megatron_moe_probe.errors import UsageError


class CorruptRunError(UsageError, ValueError):
    """A run folder that cannot be read (corruption other than a cut-short last line)."""


# pydantic speaks Python; the files are JSON.
_JSON_NAMES = {"dictionary": "an object", "list": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false"}
_JSON_WORDS = re.compile(r"a valid (dictionary|list|string|integer|number|boolean)(?: or instance of \w+)?")
_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "literal"}


def field_path(loc: tuple[Any, ...]) -> str:
    """('tokens_per_expert', 1, 0) -> 'tokens_per_expert[1][0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS or "[" in str(part) or str(part).startswith("function-"):
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
    # The members of a union fail one by one: one problem, with every type it could have been.
    same = [e for e in errors if field_path(tuple(e.get("loc", ()))) == where]
    wanted = [str(e.get("msg", "invalid")).removeprefix("Value error, ").removeprefix("Input should be ")
              for e in same]
    message = "input should be " + ", or ".join(dict.fromkeys(wanted)) if len(same) > 1 else \
        str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = _JSON_WORDS.sub(lambda m: _JSON_NAMES[m.group(1)], message[:1].lower() + message[1:])
    if first.get("type") not in ("value_error", "missing") and "input" in first:
        message += f", got {_short(first['input'])}"
    others = len(errors) - len(same)
    more = f" (and {others} more problem(s))" if others else ""
    return (f"field {where}: {message}" if where else message) + more
