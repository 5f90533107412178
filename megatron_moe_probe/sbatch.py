"""Slurm batch scripts for a recipe and for each A/B cell: `srun` starts one task per GPU and
every task is one Megatron rank.

Megatron's own rendezvous is torch.distributed's env:// (MASTER_ADDR, MASTER_PORT, WORLD_SIZE,
RANK) plus LOCAL_RANK, which Megatron reads for the device. The script derives them from
Slurm's variables (node 0 of the allocation, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID), so
`moe-probe train` inside each task sees a launcher and trains in-process (torchrun.py
`inside_launcher`), exactly as under torchrun. No torch here: the scripts render on any machine.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.torchrun import shell_join

PYTHON = "${PYTHON:-python}"  # the interpreter on the compute nodes; override with PYTHON=...
CLI_MODULE = "megatron_moe_probe.cli"
# Each task exports its own rank before running the command it is given ("$@").
RANK_WRAPPER = 'export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID"; exec "$@"'
TASK_NAME = "moe-probe-rank"


def _job_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:60] or "moe-probe"


def sbatch_script(command: list[str], *, job_name: str, nodes: int, gpus_per_node: int,
                  env: dict[str, str] | None = None, log: str | None = None, master_port: int = 29500,
                  notes: list[str] | None = None) -> str:
    """The batch script: #SBATCH header, Megatron's rendezvous variables, then one srun of
    `command` with one task per GPU on every node."""
    if nodes < 1 or gpus_per_node < 1:
        raise UsageError(f"an sbatch script needs at least 1 node and 1 GPU per node (got {nodes} x {gpus_per_node})")
    if not 0 < master_port < 65536:
        raise UsageError(f"--master-port {master_port}: not a TCP port (1-65535)")
    name = _job_name(job_name)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus_per_node}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        "#SBATCH --exclusive",
        f"#SBATCH --output={log or name + '-%j.log'}",
        "# rendered by moe-probe: one task per GPU, each task one Megatron rank (env:// rendezvous)",
        *[f"# {n}" for n in notes or []],
        "set -euo pipefail",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"  # sed reads all: no SIGPIPE under pipefail',
        "export MASTER_ADDR",
        f'export MASTER_PORT="${{MASTER_PORT:-{master_port}}}"',
        'export WORLD_SIZE="$SLURM_NTASKS"',
        *[f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()],
        f"srun --nodes={nodes} --ntasks-per-node={gpus_per_node} --gpus-per-node={gpus_per_node} "
        f"--kill-on-bad-exit=1 \\",
        f"  bash -c {shlex.quote(RANK_WRAPPER)} {TASK_NAME} \\",
        "  " + shell_join(command),
        "",
    ]
    return "\n".join(lines)


def cli_command(args: list[str]) -> list[str]:
    """`moe-probe ARGS` as the compute nodes run it."""
    return [PYTHON, "-m", CLI_MODULE, *args]


def recipe_script(spec: str, *, assume_installed: str | None = None, extra_args: list[str] | None = None,
                  master_port: int = 29500) -> str:
    """The batch script that trains a recipe (NAME[:VARIANT]) with `moe-probe train` on its own
    nodes and GPUs per node; the dispatcher is resolved now, as render does, and written as a note."""
    from megatron_moe_probe import recipes

    r = recipes.load_recipe(spec)
    availability = None
    if assume_installed is not None:
        from megatron_moe_probe.selection.availability import assumed, parse_backend_list
        from megatron_moe_probe.selection.card import default_card

        availability = assumed(default_card(), parse_backend_list(assume_installed))
    resolved = recipes.resolve_dispatcher(r, availability)
    args = ["train", spec, *(["--assume-installed", assume_installed] if assume_installed else [])]
    if extra_args:
        args += ["--", *extra_args]
    p = r.parallelism
    return sbatch_script(cli_command(args), job_name=f"moe-probe-{spec}", nodes=p.nodes, gpus_per_node=p.gpus_per_node,
                         master_port=master_port, notes=resolved.notes[:1])


def cell_script(cell, nodes: int, gpus_per_node: int, log: Path, master_port: int = 29500) -> str:
    """The batch script of one A/B cell: its own `moe-probe train` command (recipe, forced
    dispatcher, probe output folder); Slurm's log at `log` (its folder must exist)."""
    command = list(cell.command)
    if command[1:3] != ["-m", CLI_MODULE]:
        raise UsageError(f"cell {cell.name}: not a `moe-probe train` cell")
    command[0] = PYTHON
    end = command.index("--") if "--" in command else len(command)
    if any(flag in command[:end] for flag in ("--node-rank", "--master-addr", "--master-port")):
        # srun sets the rendezvous for every task (matrix.recipe_cells(per_node_rendezvous=False))
        raise UsageError(f"cell {cell.name}: per-node rendezvous flags in a Slurm cell")
    return sbatch_script(command, job_name=f"moe-probe-{cell.name}", nodes=nodes, gpus_per_node=gpus_per_node,
                         env=getattr(cell, "env", None) or None, log=str(log),
                         master_port=master_port,
                         notes=[f"A/B cell {cell.name}: " + ", ".join(f"{k}={v}" for k, v in cell.params.items())])
