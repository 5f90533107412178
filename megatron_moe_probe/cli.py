"""`moe-probe`: one entry point, one subcommand per concern.

Each subcommand is a module of `megatron_moe_probe.commands` exposing
`add_arguments(parser)` and `run(args) -> int`; the table below maps names to modules
so that only the chosen subcommand's imports are paid for.
"""

from __future__ import annotations

import argparse
import importlib
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-probe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are registered lazily below, only for the chosen command.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass: find the command without validating its arguments.
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help / the unknown-command error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"moe-probe {name}", description=COMMANDS[name][1])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UsageError as exc:
        print(f"moe-probe {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
