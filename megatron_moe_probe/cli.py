"""`moe-probe`: one entry point, one subcommand per concern.

Each subcommand is a module of `megatron_moe_probe.commands` exposing
`add_arguments(parser)` and `run(args) -> int`; the table below maps names to modules
so that only the chosen subcommand's imports are paid for.

Every mistake ends the same way: one line `moe-probe COMMAND: error: ...` on stderr and exit
code 2, never a traceback (`main`'s handlers below are the one place that decides this).
A closed output pipe (`moe-probe recommend --json | head`) ends quietly with 141, as the
shell's own tools do. A bug still says so in one line (exit 1); MOE_PROBE_TRACEBACK=1 shows it.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from megatron_moe_probe.errors import UsageError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("megatron_moe_probe.commands.demo", "tiny MoE training on CPU (EP=2, 4 or 8 over gloo) with the probe on"),
    "recommend": ("megatron_moe_probe.commands.recommend", "which token dispatcher to use, and its flags"),
    "compare": ("megatron_moe_probe.commands.compare", "compare runs: step time, TFLOP/s, memory, loss parity, routing"),
    "analyze": ("megatron_moe_probe.commands.analyze", "analyse a run: EP what-if, bands, placement, all-to-all cost, vs another run"),
    "import": ("megatron_moe_probe.commands.import_dump",
               "turn Megatron's own routing dumps (RouterTracer, tokens per expert) into a probe run folder"),
    "render": ("megatron_moe_probe.commands.render", "render a recipe to Megatron-LM args / Megatron-Bridge overrides"),
    "train": ("megatron_moe_probe.commands.train", "Megatron-Core pretraining with the probe on, through torchrun (needs GPUs)"),
    "matrix": ("megatron_moe_probe.commands.matrix", "train a grid of runs (recipes on GPU, or the CPU demo), then compare them"),
    "bench-dispatch": ("megatron_moe_probe.commands.bench_dispatch",
                       "replay a run's recorded routing through Megatron's real dispatchers (CPU: correctness; GPU: timing)"),
    "build-dataset": ("megatron_moe_probe.commands.build_dataset", "build a Megatron indexed dataset (.bin/.idx) from local text files"),
}

EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_PIPE = 128 + 13  # SIGPIPE, what `yes | head` reports


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an argument error is one line naming the command, and `--help` as usual."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="moe-probe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are registered lazily below, only for the chosen command.
    return parser


def describe_os_error(exc: OSError) -> str:
    """`cannot write /x/y: No space left on device` from an OSError, naming its file."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    target = exc.filename if exc.filename is not None else None
    if target is None:
        return reason
    verb = "cannot read" if exc.errno in (errno.ENOENT,) else "cannot write"
    return f"{verb} {os.fsdecode(target)}: {reason}"


def _closed_pipe() -> int:
    # Nothing more can reach the reader; make the interpreter's final flush of stdout quiet too.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass: find the command without validating its arguments.
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help / the unknown-command error and exits
        return EXIT_USAGE
    name = argv[0]
    prog = f"moe-probe {name}"
    try:
        module = importlib.import_module(COMMANDS[name][0])
        sub_parser = OneLineParser(prog=prog, description=COMMANDS[name][1])
        module.add_arguments(sub_parser)
        args = sub_parser.parse_args(argv[1:])
        code = int(module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full or read-only disk, a missing folder, a directory for a file
        if exc.errno == errno.EPIPE:
            return _closed_pipe()
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("MOE_PROBE_TRACEBACK"):
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(f"{prog}: internal error: {type(exc).__name__}{': ' + text if text else ''} "
              "(MOE_PROBE_TRACEBACK=1 shows where; please report it)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
