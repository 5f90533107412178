"""`moe-probe`: one entry point, one subcommand per concern.

Each subcommand is a module of `megatron_moe_probe.commands` exposing
`add_arguments(parser)` and `run(args) -> int`; the table below maps names to modules
so that only the chosen subcommand's imports are paid for.

Exit codes, the same for every command (docs/exit-codes.md lists them with examples):

    0    done
    1    the command ran and reports a failure (a matrix cell or a demo rank failed), or a bug:
         one line `moe-probe COMMAND: internal error: ...` (MOE_PROBE_TRACEBACK=1 shows where)
    2    a mistake in what was given (flag, file, folder, environment variable, damaged record,
         a folder another run is writing): one line `moe-probe COMMAND: error: ...` on stderr,
         nothing changed
    130  interrupted (Ctrl-C)
    141  standard output closed or cut (`| head`, `>&-`): nothing more is printed, quietly
    128+N  ended by signal N (a matrix cell's command, a guarded torchrun)

`main`'s handlers below are the one place that decides this.
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
    parser = OneLineParser(prog="moe-probe", description=__doc__.splitlines()[0],
                           epilog="exit codes: 0 done; 1 a failure the command reports, or a bug; 2 a mistake in "
                                  "what was given (one line on stderr); 130 interrupted; 141 output closed or cut "
                                  "(docs/exit-codes.md)")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are registered lazily below, only for the chosen command.
    return parser


def version_text() -> str:
    from megatron_moe_probe import __version__
    from megatron_moe_probe.versions import megatron_core_version

    core = megatron_core_version()  # the Megatron that imports, as run meta records it
    return f"moe-probe {__version__} (megatron-core {core or 'not installed'})"


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


class _ClosedOutput:
    """sys.stdout when the command was started with standard output closed (`>&-`): the first
    write ends the command as a closed pipe does (exit 141, nothing printed)."""

    def __init__(self) -> None:
        self._fd = os.open(os.devnull, os.O_WRONLY)

    def write(self, text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "standard output is closed")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd


def _internal_error(prog: str, exc: BaseException) -> int:
    from megatron_moe_probe.environment import TRACEBACK_ENV

    if os.environ.get(TRACEBACK_ENV):
        raise exc
    text = str(exc).splitlines()[0] if str(exc) else ""
    print(f"{prog}: internal error: {type(exc).__name__}{': ' + text if text else ''} "
          f"({TRACEBACK_ENV}=1 shows where; please report it)", file=sys.stderr)
    return EXIT_BUG


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout is None:
        sys.stdout = _ClosedOutput()  # type: ignore[assignment]
    parser = build_parser()
    # First pass: find the command without validating its arguments.
    if not argv or argv[0] not in COMMANDS:
        try:
            parser.parse_args(argv)  # prints help / the version / the unknown-command error and exits
        except SystemExit as exc:
            sys.stdout.flush()
            return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
        except BrokenPipeError:
            return _closed_pipe()
        return EXIT_USAGE
    name = argv[0]
    prog = f"moe-probe {name}"
    try:
        from megatron_moe_probe.environment import check_environment

        check_environment()  # a variable we read that holds nonsense: before anything starts
        module = importlib.import_module(COMMANDS[name][0])
        sub_parser = OneLineParser(prog=prog, description=COMMANDS[name][1])
        module.add_arguments(sub_parser)
        from megatron_moe_probe.commands import bound_numeric_flags

        bound_numeric_flags(sub_parser)  # no number a user types reaches an overflow
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
    except SystemExit as exc:
        # rich ends a command whose output pipe closed with SystemExit(1), raised while handling
        # the BrokenPipeError: that is a closed pipe, 141 as for every other output.
        if isinstance(exc.__context__, BrokenPipeError):
            return _closed_pipe()
        raise
    except RecursionError as exc:  # a JSON or YAML nested beyond reason: a mistake in the file
        print(f"{prog}: error: input nested too deeply ({exc})", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback on request
        return _internal_error(prog, exc)


if __name__ == "__main__":
    sys.exit(main())
