"""`moe-probe analyze RUN`: what a recorded run's routing means for EP, placement and the
all-to-all (analysis/ does the work; docs/analysis.md has the formulas)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from dataclasses import fields

from megatron_moe_probe.analysis import a2a_cost
from megatron_moe_probe.analysis.domains import batch_size_sweep
from megatron_moe_probe.analysis.mock_vs_real import compare_runs
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.analysis.run_analysis import AnalysisOptions, analyze
from megatron_moe_probe.analysis.runs import load_window
from megatron_moe_probe.commands import analyze_output as render
from megatron_moe_probe.commands import int_list, output_file, print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="probe run folder (intervals.jsonl + meta.json)")
    p.add_argument("--against", metavar="RUN_B", help="compare routing imbalance with another run of the model "
                   "(e.g. mock vs real data; the direction is reported whichever way it comes out)")
    p.add_argument("--sweep", nargs="+", metavar="RUN", help="other runs of the same model and data at other batch "
                   "sizes: imbalance by batch size (DODOCO's batch-size effect)")
    p.add_argument("--drift-windows", type=int, default=4, metavar="N",
                   help="consecutive windows the run is cut into for the drift table (default 4)")
    p.add_argument("--steps", metavar="START:END", help="intervals closing at iterations START..END (default all)")
    p.add_argument("--layers", type=int_list, metavar="N,N", help="global layer numbers (default all MoE layers)")
    p.add_argument("--ep", type=int_list, metavar="N,N",
                   help="EP degrees for the what-if and the cost model (default every divisor of E above 1)")
    p.add_argument("--target-ep", type=int, metavar="N", help="EP for the placement (default the run's EP)")
    p.add_argument("--replicate", type=int, metavar="R",
                   help="hottest experts given a second copy (default the target EP: one extra slot per rank)")
    p.add_argument("--replica-slots", type=int, default=1, metavar="N",
                   help="per-iteration replication model (MoonEP/UltraEP): replica slots per rank (default 1)")
    p.add_argument("--band-thresholds", metavar="MAX/MEAN,GINI",
                   help="high band at or above both (default 2.0,0.25: our choice)")
    cost = p.add_argument_group("all-to-all cost model (defaults from meta.json where it says)")
    cost.add_argument("--hidden-size", type=int)
    cost.add_argument("--bytes-per-element", type=int, help="activation bytes (default from --bf16/--fp16, else 2)")
    cost.add_argument("--tokens-per-rank", type=int,
                      help="tokens one rank dispatches per call (default micro-batch x seq-length / (TP x CP))")
    cost.add_argument("--gpus-per-node", type=int)
    cost.add_argument("--intra-node-gbs", type=float, default=a2a_cost.Fabric.intra_node_gb_s,
                      help="GB/s per GPU per direction inside a node (default 450: NVLink 4 peak)")
    cost.add_argument("--inter-node-gbs", type=float, default=a2a_cost.Fabric.inter_node_gb_s,
                      help="GB/s per GPU per direction between nodes (default 50: one 400 Gb/s NIC per GPU)")
    cost.add_argument("--latency-us", type=float, default=a2a_cost.Fabric.latency_us,
                      help="fixed cost of one all-to-all (default 10 us: our choice)")
    p.add_argument("--mapping", action="store_true", help="print every placement's experts per rank")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="also plot the what-if, the placements and the comparison")
    p.add_argument("--plot-dir", metavar="DIR", help="one plot per question into DIR: domain heatmaps, domain "
                   "divergence, cross-domain placement, drift, batch-size sweep, mock vs real")


def replication_of(window, ep: int, slots: int) -> dict:
    """Per-iteration replication of hot experts (analysis/replication.py) beside the static
    placements, on the per-iteration counts when recorded, else on each interval's counts."""
    from megatron_moe_probe.analysis.replication import replication_section

    if slots < 0:
        raise UsageError(f"--replica-slots must be >= 0, got {slots}")
    counts = window.iteration_counts()
    section = replication_section(counts if counts is not None else window.tokens_per_expert(), ep, slots)
    if counts is None:
        section["basis"] = "per interval (no per-iteration records): a lower bound on per-micro-batch imbalance"
    return section


def options_from(args: argparse.Namespace) -> AnalysisOptions:
    return AnalysisOptions(**{f.name: getattr(args, f.name) for f in fields(AnalysisOptions)})


def run(args: argparse.Namespace) -> int:
    plot = output_file(args.plot, "--plot", ".png")  # checked before the run is read
    window = load_window(args.run, args.steps, args.layers)
    result = analyze(window, options_from(args))
    if args.drift_windows < 1:
        raise UsageError(f"--drift-windows must be >= 1, got {args.drift_windows}")
    result["replication"] = replication_of(window, result["placement"]["ep"], args.replica_slots)
    if args.against:
        result["against"] = compare_runs(window, load_window(args.against, args.steps, args.layers))
    if args.sweep:
        result["sweep"] = batch_size_sweep([window] + [load_window(r, args.steps, args.layers) for r in args.sweep])
    if args.json:
        print_json(result)
    else:
        render.print_result(result, show_mapping=args.mapping)
    if plot:
        render.plot(result, plot)
        print(f"plot: {plot}", file=sys.stderr if args.json else sys.stdout)
    if args.plot_dir:
        written = render.plot_questions(result, Path(args.plot_dir))
        print("plots: " + ", ".join(str(p) for p in written), file=sys.stderr if args.json else sys.stdout)
    return 0
