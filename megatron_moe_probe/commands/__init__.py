"""The `moe-probe` commands: one module per command, each with `add_arguments(parser)` and
`run(args) -> int`. Only this package parses arguments and prints; the library it calls
takes plain values. Nothing but `megatron_moe_probe.cli` imports it.
"""

from __future__ import annotations

import argparse
import sys


def args_after_dashdash(parse):
    """Wrap a parser's parse_args: what follows `--` goes to `.megatron_args` untouched (argparse
    cannot take a positional recipe *and* free-form args after `--`)."""

    def parse_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        tail: list[str] = []
        if "--" in args:
            i = args.index("--")
            args, tail = args[:i], args[i + 1:]
        ns = parse(args, namespace)
        ns.megatron_args = tail
        return ns

    return parse_args


def print_json(data) -> None:
    """Strict JSON on stdout (every `--json`): NaN and infinities become null, as in the records."""
    import json

    from megatron_moe_probe.record import to_json_safe

    print(json.dumps(to_json_safe(data), indent=1, allow_nan=False))


def output_file(path: str | None, flag: str, suffix: str | None = None):
    """Check an output file argument before any work starts; returns it as a Path (or None).

    It must not be a directory, its folder must exist and be writable, and with `suffix`
    (".png") it must end in it, so that the file written is exactly the one named."""
    import os
    from pathlib import Path

    from megatron_moe_probe.errors import UsageError

    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory; name a file" + (f" ending {suffix}" if suffix else ""))
    if suffix and p.suffix.lower() != suffix:
        raise UsageError(f"{flag} {path}: name a {suffix} file (e.g. {p.with_suffix(suffix)})")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: folder {folder} is not writable")
    return p


def int_list(text: str) -> list[int]:
    """argparse type for `--x 2,4,8` (each within +-MAX_FLAG_INT)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from None
    if any(abs(v) > MAX_FLAG_INT for v in values):
        raise argparse.ArgumentTypeError(f"want integers of at most {MAX_FLAG_INT}, got {text}")
    return values


# Largest value a count-like flag takes (EP degree, experts, hidden size, interval, ...): far
# above any real model, far below what overflows the int64 tensors the analyses build.
MAX_FLAG_INT = 1 << 31


def bounded_int(low: int = 1, high: int = MAX_FLAG_INT):
    """argparse type: an integer in [low, high], else one line naming the bounds."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"want an integer from {low} to {high}, got {text}")
        return value

    parse.__name__ = "integer"
    return parse



def save_figure(fig, path) -> None:
    """A matplotlib figure as PNG at exactly `path`, whole or not at all (temp file + rename:
    a full disk leaves no 0-byte or half image behind)."""
    from megatron_moe_probe.record import replace_atomically

    replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def any_int(text: str) -> int:
    """argparse type that every plain `type=int` flag gets (cli.py): an integer within
    +-MAX_FLAG_INT, so that no flag reaches a tensor or a C library as an overflow."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want an integer, got {text!r}") from None
    if abs(value) > MAX_FLAG_INT:
        raise argparse.ArgumentTypeError(f"want an integer of at most {MAX_FLAG_INT}, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type that every plain `type=float` flag gets (cli.py): a finite number."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number, got {text!r}") from None
    if not math.isfinite(value) or abs(value) > 1e15:
        raise argparse.ArgumentTypeError(f"want a finite number of at most 1e15, got {text}")
    return value


def bound_numeric_flags(parser: argparse.ArgumentParser) -> None:
    """Give every `type=int` / `type=float` flag of a command its bounded form (see any_int)."""
    for action in parser._actions:  # noqa: SLF001 - argparse keeps them here, groups included
        if action.type is int:
            action.type = any_int
        elif action.type is float:
            action.type = finite_float
