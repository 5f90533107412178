"""The torchrun command of `moe-probe train`: Megatron args from a recipe (or raw args), the
environment the dispatcher needs, and `python -m torch.distributed.run` around the worker
(megatron/launch.py).

It always starts the workers through torchrun, also for one GPU: Megatron reads RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and torchrun sets them all, picks a free
port (`--standalone`) and tears every worker down when one fails. When those variables are
already set (the command runs inside torchrun/srun), the caller trains in-process instead.
No torch and no Megatron here: a dry run works on any machine.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Optional

from megatron_moe_probe.errors import UsageError

WORKER_MODULE = "megatron_moe_probe.megatron.launch"  # what torchrun runs on every rank

# Shell variables in printed commands (a node's rank, node 0's address): printed in double
# quotes so the shell on that node expands them; every other word is quoted as it is.
NODE_RANK_VAR = "$NODE_RANK"
MASTER_ADDR_VAR = "$MASTER_ADDR"
_PLACEHOLDER = re.compile(r"^\$(\{[A-Za-z_][A-Za-z0-9_]*(:[-?][^}]*)?\}|[A-Za-z_][A-Za-z0-9_]*)$")


def is_placeholder(word: str) -> bool:
    return bool(_PLACEHOLDER.match(word))


def shell_join(words: list[str]) -> str:
    """shlex.join, except that shell-variable placeholders stay expandable ("$NODE_RANK")."""
    return " ".join(f'"{w}"' if is_placeholder(w) else shlex.quote(w) for w in words)


@dataclass
class TrainPlan:
    megatron_args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the workers
    recipe_world: Optional[int] = None  # GPUs the recipe is laid out for; None for raw args
    notes: list[str] = field(default_factory=list)


def recipe_spec(recipe: str, variant: Optional[str]) -> str:
    """NAME[:VARIANT] from a recipe argument and an optional --variant."""
    if not variant:
        return recipe
    if ":" in recipe and not os.path.exists(recipe):
        raise UsageError(f"give the variant once: {recipe!r} and --variant {variant!r}")
    return f"{recipe}:{variant}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def blend_prefixes(data_path: list[str]) -> list[str]:
    """The prefixes of Megatron's `--data-path` list: `PREFIX ...` or `W1 PREFIX1 W2 PREFIX2 ...`."""
    if len(data_path) % 2 == 0 and all(_is_number(w) for w in data_path[::2]):
        return list(data_path[1::2])
    return list(data_path)


def plan_training(recipe: Optional[str], *, variant: Optional[str] = None, data_path: Optional[list[str]] = None,
                  assume_installed: Optional[str] = None, include_probe: bool = True,
                  extra_args: Optional[list[str]] = None, dispatcher: Optional[str] = None) -> TrainPlan:
    """Megatron args, environment and notes for a recipe (extra args appended, so they win), or
    for raw Megatron args alone when `recipe` is None. `dispatcher` forces the recipe's
    dispatcher to one backend id (one A/B cell, `train --dispatcher`)."""
    from megatron_moe_probe import recipes

    extra = list(extra_args or [])
    if recipe is None:
        if variant or data_path or dispatcher:
            raise UsageError("--variant, --data-path and --dispatcher need a recipe "
                             "(with raw args, give Megatron's own --data-path and dispatcher flags)")
        if not extra:
            raise UsageError("name a recipe (moe-probe render --list) or give Megatron args after --")
        return TrainPlan(extra)
    r = recipes.load_recipe(recipe_spec(recipe, variant))
    if dispatcher:
        r = recipes.with_dispatcher(r, dispatcher)
    if data_path:
        from megatron_moe_probe.dataset_files import require_dataset

        for prefix in blend_prefixes(data_path):
            require_dataset(prefix, "--data-path", "build one with `moe-probe build-dataset`")
        data = r.data.model_copy(update={"source": "path", "paths": list(data_path), "split": "100,0,0"})
        r = r.model_copy(update={"data": data})
    availability = None
    if assume_installed is not None:
        from megatron_moe_probe.selection.availability import assumed, parse_backend_list
        from megatron_moe_probe.selection.card import default_card

        availability = assumed(default_card(), parse_backend_list(assume_installed))
    resolved = recipes.resolve_dispatcher(r, availability)
    margs = recipes.render(r, resolved=resolved)
    if include_probe:
        margs += recipes.probe_args(r)
    return TrainPlan(margs + extra, dict(resolved.env), r.parallelism.world_size, list(resolved.notes))


def torchrun_command(megatron_args: list[str], *, recipe: Optional[str] = None, variant: Optional[str] = None,
                     nnodes: Optional[int] = None, nproc_per_node: Optional[int] = None,
                     node_rank: Optional[int | str] = None, master_addr: Optional[str] = None,
                     master_port: int = 29500, placeholders: bool = False) -> tuple[list[str], int, int]:
    """(command, processes per node, nodes); node and process counts default to the recipe's.
    With `placeholders` (a dry run, a printed plan), a multi-node command that lacks the node's
    rank or node 0's address gets the shell variables $NODE_RANK / $MASTER_ADDR instead of an error."""
    from megatron_moe_probe import recipes

    for flag, value in (("--nproc-per-node", nproc_per_node), ("--nnodes", nnodes)):
        if value is not None and value < 1:  # 0 is a mistake, not "the default"
            raise UsageError(f"{flag} {value}: must be at least 1")
    if not 0 < master_port < 65536:
        raise UsageError(f"--master-port {master_port}: not a TCP port (1-65535)")
    nnodes_, nproc = nnodes, nproc_per_node
    if recipe is not None and (nnodes_ is None or nproc is None):
        par = recipes.load_recipe(f"{recipe}:{variant}" if variant else recipe).parallelism
        nnodes_ = par.nodes if nnodes_ is None else nnodes_
        nproc = par.gpus_per_node if nproc is None else nproc
    nnodes_, nproc = nnodes_ or 1, nproc or 1
    if nproc < 1 or nnodes_ < 1:
        raise UsageError("--nproc-per-node and --nnodes must be at least 1")
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes_ == 1:
        torchrun += ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc)]
    else:
        if placeholders:
            master_addr = MASTER_ADDR_VAR if master_addr is None else master_addr
            node_rank = NODE_RANK_VAR if node_rank is None else node_rank
        if master_addr is None or node_rank is None:
            raise UsageError(f"--nnodes {nnodes_} needs --master-addr (node 0's address) and --node-rank (this node's rank); "
                             "--dry-run prints the per-node commands without them")
        if isinstance(node_rank, int) and not 0 <= node_rank < nnodes_:
            raise UsageError(f"--node-rank {node_rank} is outside 0..{nnodes_ - 1}")
        torchrun += ["--nnodes", str(nnodes_), "--node-rank", str(node_rank), "--master-addr", master_addr,
                     "--master-port", str(master_port), "--nproc-per-node", str(nproc)]
    return torchrun + ["-m", WORKER_MODULE, *megatron_args], nproc, nnodes_


def inside_launcher() -> bool:
    """RANK/WORLD_SIZE/MASTER_ADDR already set: torchrun, srun wrappers or mpirun started us."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def format_command(cmd: list[str], env: dict[str, str]) -> str:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(shell_join(cmd))
    return "\n".join(lines)


def per_node_commands(build, nnodes: int, node_rank: Optional[int], master_addr: Optional[str],
                      max_listed: int = 8) -> list[tuple[str, list[str]]]:
    """(heading, command) for a multi-node launch: one command per node when the nodes are few
    and no --node-rank was given, else the one command (with $NODE_RANK when not given).
    `build(node_rank, master_addr)` makes one command; a missing address stays $MASTER_ADDR."""
    if node_rank is not None or nnodes > max_listed:
        where = f"node {node_rank}" if node_rank is not None else f"each of the {nnodes} nodes, NODE_RANK=0..{nnodes - 1}"
        return [(f"on {where}" + ("" if master_addr else "; MASTER_ADDR = node 0's address"), build(node_rank, master_addr))]
    return [(f"node {r} of {nnodes}" + (" (MASTER_ADDR: this node's address)" if r == 0 and not master_addr else ""),
             build(r, master_addr)) for r in range(nnodes)]
