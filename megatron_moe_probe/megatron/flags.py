"""The probe's flags for Megatron's own argument parser (`extra_args_provider`).

    parse_and_validate_args(extra_args_provider=add_probe_args)
    parse_and_validate_args(extra_args_provider=chain_args(my_provider))

Value errors (a bad writer name, an interval < 1) are argparse errors: the run
stops before it starts, with one message naming the flag. Everything that can
only be known later (an unwritable folder, a model without MoE layers) is a
warning at run time and never stops training.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

from megatron_moe_probe.settings import (DEFAULT_HEATMAP_EVERY, DEFAULT_INTEGRITY, DEFAULT_INTEGRITY_PAYLOAD_EVERY,
                                        DEFAULT_ITERATIONS, DEFAULT_TIMING_EVERY, FLAGS, INTEGRITY_MODES, ITERATION_MODES, MAX_HISTORY, TIMING_MODES, ProbeSettings,
                                        dest)
from megatron_moe_probe.writers.base import WRITER_NAMES

GROUP_TITLE = "moe-probe"


def _writer_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in WRITER_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown writer {', '.join(map(repr, unknown))}; choose from {', '.join(WRITER_NAMES)}"
        )
    if not names:
        raise argparse.ArgumentTypeError(f"give at least one of {', '.join(WRITER_NAMES)}")
    return names


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "0 or a positive integer")


def add_probe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the --moe-probe* flags to a (Megatron) argument parser and return it."""
    if any(getattr(g, "title", None) == GROUP_TITLE for g in parser._action_groups):
        return parser  # already added (e.g. chained twice)
    g = parser.add_argument_group(title=GROUP_TITLE, description="MoE routing / dispatch telemetry")
    g.add_argument(FLAGS["enabled"], action="store_true", help="record per-layer routing statistics")
    g.add_argument(FLAGS["interval"], type=_positive_int, default=None,
                   help="iterations per report (default: --log-interval)")
    g.add_argument(FLAGS["out_dir"], default=None,
                   help="run folder for the local store (default: <--save>/moe_probe, else ./moe_probe_runs/<time>)")
    g.add_argument(FLAGS["writers"], type=_writer_list, default=None,
                   help=f"comma-separated writers from {', '.join(WRITER_NAMES)} (default: local, plus "
                        "tensorboard when --tensorboard-dir is set and wandb when --wandb-project is set)")
    g.add_argument(FLAGS["timing"], nargs="?", const=TIMING_MODES[0], default=None, choices=TIMING_MODES,
                   help="time token_dispatch / token_combine per layer with CUDA events, on one iteration in "
                        f"{FLAGS['timing_every']} (default {DEFAULT_TIMING_EVERY}): forward calls only (the flag alone, "
                        "or `forward`), or forward and backward (`all`, two autograd hooks more per call)")
    g.add_argument(FLAGS["timing_every"], type=_positive_int, default=DEFAULT_TIMING_EVERY,
                   help="dispatcher timing samples one iteration in N: the first of each report interval, then "
                        "every N-th; the record's meta.timing_every says N and meta.timing_sampled_iterations how many")
    g.add_argument(FLAGS["integrity"], choices=INTEGRITY_MODES, default=DEFAULT_INTEGRITY,
                   help="check on the device that the token dispatcher delivered what the router decided (counts "
                        "of every forward, per layer and expert, judged every interval): warn (default) logs a "
                        "violation, fail also stops training at that iteration, off skips the check")
    g.add_argument(FLAGS["integrity_payload_every"], type=_non_negative_int, default=DEFAULT_INTEGRITY_PAYLOAD_EVERY,
                   help="also check an exact fingerprint of the rows themselves (corrupted values, swapped rows) on "
                        "one iteration in N; 0, the default, checks counts only: the fingerprint costs several "
                        "times a MoE layer's expert GEMMs on the iterations it runs (docs/performance.md)")
    g.add_argument(FLAGS["gpus_per_node"], type=_positive_int, default=None,
                   help="GPUs per node for local / intra-node / inter-node traffic (default: LOCAL_WORLD_SIZE)")
    g.add_argument(FLAGS["history"], type=_positive_int, default=None,
                   help=f"per-step counts kept per interval for step statistics (default: the interval, max {MAX_HISTORY})")
    g.add_argument(FLAGS["heatmap_every"], type=_positive_int, default=DEFAULT_HEATMAP_EVERY,
                   help="reports between per-expert heatmaps/histograms in TensorBoard and wandb")
    g.add_argument(FLAGS["iterations"], choices=ITERATION_MODES, default=DEFAULT_ITERATIONS,
                   help="per-iteration records in the run folder's iterations/*.npz: each iteration's "
                        "[layer, expert] counts (counts, the default), also its rank matrix (matrix), or off")
    g.add_argument(FLAGS["domains"], default=None, metavar="auto|off|NAME,...|PREFIX=NAME,...",
                   help="split counts by the dataset of each sample when training on a blend (default: one "
                        "domain per --data-path prefix, named by its file name); names in blend order, or "
                        "PREFIX=NAME pairs (equal names merge datasets); off")
    return parser


def chain_args(*providers: Optional[Callable]) -> Callable:
    """One extra_args_provider that adds the probe's flags after the user's own."""

    def provider(parser):
        for p in providers:
            if p is not None:
                parser = p(parser) or parser
        return add_probe_args(parser)

    return provider


def flags_without_probe(args) -> list[str]:
    """Probe flags given while --moe-probe is off: they would silently do nothing."""
    if getattr(args, dest("enabled"), False):
        return []
    defaults = {dest("heatmap_every"): DEFAULT_HEATMAP_EVERY, dest("iterations"): DEFAULT_ITERATIONS,
                dest("timing_every"): DEFAULT_TIMING_EVERY, dest("integrity"): DEFAULT_INTEGRITY,
                dest("integrity_payload_every"): DEFAULT_INTEGRITY_PAYLOAD_EVERY}
    prefix = dest("enabled") + "_"
    return [
        "--" + name.replace("_", "-")
        for name, value in sorted(vars(args).items())
        if name.startswith(prefix) and value not in (None, False, defaults.get(name))
    ]


def resolve(args) -> ProbeSettings:
    """Effective probe settings from parsed Megatron args, with defaults filled in."""
    import os
    import time

    given = {field: getattr(args, dest(field)) for field in FLAGS if field != "enabled"}
    interval = given["interval"] or getattr(args, "log_interval", None) or 100
    writers = given["writers"]
    if writers is None:
        writers = ["local"]
        if getattr(args, "tensorboard_dir", None):
            writers.append("tensorboard")
        if getattr(args, "wandb_project", None):
            writers.append("wandb")
    out_dir = given["out_dir"]
    if out_dir is None:
        save = getattr(args, "save", None)
        out_dir = os.path.join(save, "moe_probe") if save else os.path.join(
            "moe_probe_runs", time.strftime("%Y%m%d-%H%M%S"))
    return ProbeSettings.create(
        interval,
        writers=writers,
        out_dir=out_dir,
        timing=given["timing"],
        gpus_per_node=given["gpus_per_node"],
        history=given["history"],
        heatmap_every=given["heatmap_every"] or DEFAULT_HEATMAP_EVERY,
        iterations=given["iterations"] or DEFAULT_ITERATIONS,
        domains=given["domains"],
        timing_every=given["timing_every"] or DEFAULT_TIMING_EVERY,
        integrity=given["integrity"] or DEFAULT_INTEGRITY,
        integrity_payload_every=given["integrity_payload_every"] or DEFAULT_INTEGRITY_PAYLOAD_EVERY,
    )


class _Refused(Exception):
    pass


def check_megatron_args(argv: list[str]) -> None:
    """Parse `argv` with Megatron's own parser plus the probe's flags, as every worker will, and
    raise UsageError naming the first mistake (`--moe-probe-interval -3`, an unknown writer, a
    misspelt Megatron flag): before anything is printed or launched, so it costs no GPU time.
    Only the parsing: what Megatron validates against the world size is checked by the workers."""
    import warnings

    from megatron_moe_probe.errors import UsageError

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise _Refused(message)

    from megatron_moe_probe.quiet import quiet_cpu_notices

    quiet_cpu_notices()  # import notices (no CUDA here, no TE/Apex) tell a dry run nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.training.arguments import add_megatron_arguments

        parser = Parser(description="Megatron-LM Arguments", allow_abbrev=False)
        parser = add_megatron_arguments(parser)
    parser = add_probe_args(parser)
    try:
        parser.parse_args(argv)
    except _Refused as exc:
        raise UsageError(f"Megatron args: {exc}") from None
