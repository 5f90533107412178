"""The matched A/B that decides a dispatcher: a `moe-probe matrix` command on the user's recipe.

The card's `ab_plan` says how long to run, the timing window, how many repeats and which
benchmark-only controls go into every cell; this module turns a Recommendation into the
exact command. Only installed backends go into the A/B (a missing one is an environment
limitation, not a cell that fails); the bring-up path is always in it as the baseline.
Everything but the dispatcher is the recipe's, the same in every cell.
"""

from __future__ import annotations

import shlex

from megatron_moe_probe.selection.card import Card
from megatron_moe_probe.selection.recommend import Recommendation

RECIPE_PLACEHOLDER = "RECIPE"


def ab_plan(card: Card, rec: Recommendation, recipe: str | None, assume_installed: str | None = None,
            out: str | None = None) -> dict | None:
    """The A/B plan for a performance-stage answer; None at bring-up or EP=1 (nothing to compare)."""
    if rec.decision in ("bring-up", "ep-one"):
        return None
    ab = card.ab_plan
    backends = rec.ab_backends
    missing = [c.backend for c in rec.candidates if not c.installed]
    out = out or f"runs/ab-{(recipe or RECIPE_PLACEHOLDER).replace(':', '-')}"
    cmd = ["moe-probe", "matrix", recipe or RECIPE_PLACEHOLDER, "--dispatcher", ",".join(backends),
           "--iters", str(ab.iters), "--warmup", str(ab.warmup), "--repeat", str(ab.repeat), "--out", out]
    if assume_installed is not None:
        cmd += ["--assume-installed", assume_installed]
    dry = [*cmd, "--dry-run", "--", *ab.benchmark_args]  # validates every cell, trains nothing (runs on CPU)
    cmd += ["--", *ab.benchmark_args]
    if rec.winner is not None:
        decides = (f"measured winner {card.backend(rec.winner.backend).label} ({rec.winner.source}, {rec.winner.date}); "
                   "the A/B confirms it on your stack")
    else:
        decides = "no measured winner for this model, hardware and scale: the A/B decides"
        if rec.near_miss and rec.near_miss["fields"]:
            decides += (f" (the closest measured winner, {rec.near_miss['row']}, differs in "
                        f"{', '.join(rec.near_miss['fields'])})")
    notes = []
    if recipe is None:
        notes.append(f"no recipe matches the query: replace {RECIPE_PLACEHOLDER} with yours (moe-probe render --list)")
    if len(backends) < 2:
        notes.append("only the baseline is installed: install a candidate before the A/B means anything")
    multi_node = []
    if rec.query.nodes > 1:
        from megatron_moe_probe.torchrun import MASTER_ADDR_VAR, NODE_RANK_VAR, shell_join

        head = cmd[:cmd.index("--")]
        per_node = [*head, "--node-rank", NODE_RANK_VAR, "--master-addr", MASTER_ADDR_VAR, "--", *ab.benchmark_args]
        sb_dir = f"{out}-sbatch"
        multi_node = [f"{rec.query.nodes} nodes: on every node, with NODE_RANK and MASTER_ADDR (node 0) set: "
                      + shell_join(per_node),
                      "or under Slurm (one batch script per cell, srun with one task per GPU): "
                      + shell_join([*head, "--sbatch", sb_dir, "--", *ab.benchmark_args])]
    return {
        "decides": decides,
        "recipe": recipe,
        "backends": backends,
        "not_installed": missing,
        "command": cmd,
        "shell": shlex.join(cmd),
        "dry_run_command": dry,
        "held_fixed": list(ab.held_fixed),
        "benchmark_only": {"args": list(ab.benchmark_args), "disclosure": " ".join(ab.disclosure.split())},
        "timing_window": {"iters": ab.iters, "warmup": ab.warmup, "repeat": ab.repeat},
        "source": ab.source,
        "date": ab.date,
        "notes": notes,
        "multi_node": multi_node,
    }
