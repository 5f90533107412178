"""The `moe-probe` commands: one module per command, each with `add_arguments(parser)` and
`run(args) -> int`. Only this package parses arguments and prints; the library it calls
takes plain values. Nothing but `megatron_moe_probe.cli` imports it.
"""

from __future__ import annotations

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
