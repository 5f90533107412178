"""`moe-probe train`: Megatron-Core pretraining with the probe on, through torchrun
(torchrun.py builds the command, megatron/launch.py is the worker)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from megatron_moe_probe import torchrun
from megatron_moe_probe.commands import args_after_dashdash
from megatron_moe_probe.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = ("moe-probe train [RECIPE[:VARIANT]] [--variant V] [--dispatcher BACKEND] [--nproc-per-node N] "
               "[--nnodes M --node-rank R --master-addr HOST [--master-port P]] [--dry-run] [-- MEGATRON ARGS...]")
    p.description = ("Megatron-Core pretraining (GPT/MoE) with the probe on, through torchrun. Give a recipe "
                     "(rendered with its --moe-probe* flags; Megatron args after -- are appended and win), or "
                     "only raw Megatron args after --.")
    p.add_argument("recipe", nargs="?", help="recipe NAME, NAME:VARIANT or a path to a recipe .yaml")
    p.add_argument("--variant", default=None, help="recipe variant (same as NAME:VARIANT)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="GPUs (processes) per node; default: the recipe's gpus_per_node, else 1")
    p.add_argument("--nnodes", type=int, default=None, help="nodes; default: the recipe's nodes, else 1")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (multi-node)")
    p.add_argument("--master-addr", default=None, help="node 0's address (multi-node)")
    p.add_argument("--master-port", type=int, default=29500, help="node 0's port (multi-node; default 29500)")
    p.add_argument("--no-probe", action="store_true", help="leave out the recipe's --moe-probe* flags")
    p.add_argument("--dispatcher", default=None, metavar="BACKEND",
                   help="force the recipe's dispatcher (alltoall, allgather, deepep, hybridep, ncclep): one A/B cell")
    p.add_argument("--assume-installed", default=None, metavar="LIST",
                   help="resolve the recipe's `auto` dispatcher for another machine: comma list "
                        "(deepep,hybridep,ncclep,permute-fusion), 'all' or 'none'; default: probe this machine")
    p.add_argument("--data-path", nargs="+", default=None, metavar="PREFIX",
                   help="train the recipe on these indexed datasets (.bin/.idx prefixes, e.g. from "
                        "`moe-probe build-dataset`, or a blend `W1 PREFIX1 W2 PREFIX2 ...`: the probe then "
                        "splits counts by dataset) instead of its own data, all of it for training")
    p.add_argument("--dry-run", action="store_true", help="print the exact command (and environment) and exit")
    p.parse_args = args_after_dashdash(p.parse_args)


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_moe_probe.megatron import launch as worker

    from megatron_moe_probe import lifetime
    from megatron_moe_probe.megatron.flags import check_megatron_args

    plan = torchrun.plan_training(args.recipe, variant=args.variant, data_path=args.data_path,
                                  assume_installed=args.assume_installed, include_probe=not args.no_probe,
                                  extra_args=args.megatron_args, dispatcher=args.dispatcher)
    launched = torchrun.inside_launcher()  # srun/torchrun already set the rendezvous: no command needed

    def build(node_rank, master_addr):
        return torchrun.torchrun_command(
            plan.megatron_args, recipe=args.recipe, variant=args.variant, nnodes=args.nnodes,
            nproc_per_node=args.nproc_per_node, node_rank=node_rank, master_addr=master_addr,
            master_port=args.master_port, placeholders=args.dry_run or launched)

    cmd, nproc, nnodes = build(args.node_rank, args.master_addr)
    # Megatron's own parser with the probe's flags, before anything is printed or launched:
    # a mistake (`--moe-probe-interval -3`, an unknown writer, a misspelt flag) costs no GPU time.
    check_megatron_args(plan.megatron_args)
    notes, env = plan.notes, plan.env
    world = nproc * nnodes
    if plan.recipe_world is not None and world != plan.recipe_world:
        notes.append(f"warning: the recipe is laid out for {plan.recipe_world} GPU(s), launching {world}; "
                     "Megatron re-derives data parallelism and checks the batch sizes")
    if args.dry_run:
        print(f"# torchrun (python -m torch.distributed.run): {nproc} process(es) per node x {nnodes} node(s)")
        for n in notes:
            print(f"# {n}")
        if nnodes == 1:
            print(torchrun.format_command(cmd, env))
            return 0
        print("# multi-node: run one command per node (or `moe-probe render RECIPE --format sbatch` for Slurm)")
        for heading, node_cmd in torchrun.per_node_commands(lambda r, a: build(r, a)[0], nnodes, args.node_rank,
                                                            args.master_addr):
            print(f"# {heading}")
            print(torchrun.format_command(node_cmd, env))
        return 0
    for n in notes:
        print(f"moe-probe train: {n}", file=sys.stderr)
    if not torch.cuda.is_available():
        raise UsageError(worker.NO_CUDA)
    if launched:
        os.environ.update(env)
        return worker.main(plan.megatron_args)
    have = torch.cuda.device_count()
    if nproc > have:
        raise UsageError(f"--nproc-per-node {nproc} but this node has {have} GPU(s)")
    child_env = {**os.environ, **env}
    print(f"moe-probe train: {torchrun.format_command(cmd, env)}", file=sys.stderr, flush=True)
    # Under the guard (lifetime.py): torchrun and every worker stop when this process dies,
    # whatever the signal (kill -9 included); Ctrl-C and SIGTERM reach torchrun once, through it.
    proc = subprocess.Popen(lifetime.guarded(cmd), env=child_env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the guard got it too and forwards it to torchrun: wait for the clean-up
            continue
