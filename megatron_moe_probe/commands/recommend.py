"""`moe-probe recommend`: which MoE token dispatcher to use, why, and its exact flags
(the decision is selection/recommend.py; this module reads the command line and prints)."""

from __future__ import annotations

import argparse
import json
from typing import Callable

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.availability import Availability, assumed, parse_backend_list, probe
from megatron_moe_probe.selection.card import BACKEND_IDS, Card, default_card
from megatron_moe_probe.selection.hardware import Detected, detect_gpus, resolve_topology
from megatron_moe_probe.selection.recommend import Query, format_text, recommend


def add_arguments(p: argparse.ArgumentParser) -> None:
    card = default_card()
    p.add_argument("--hardware", default="auto", help=f"auto (NVML / nvidia-smi) or one of: {', '.join(card.hardware_ids)}")
    p.add_argument("--ep", type=int, required=True, help="expert-parallel degree")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: detected, else the card's value for the hardware")
    p.add_argument("--nodes", type=int, default=None, help="default: the fewest nodes that hold the EP group")
    p.add_argument("--nvlink-domain", type=int, default=None, help="GPUs per NVLink domain (default: node for HGX, 72 for NVL72)")
    p.add_argument("--model", default="other", help="model family or recipe name (e.g. qwen3-30b-a3b, deepseek-v3, vlm, other)")
    p.add_argument("--stage", default="performance", choices=[s.id for s in card.stages])
    p.add_argument("--precision", default="bf16", choices=list(card.precisions))
    p.add_argument("--memory-tight", action="store_true", help="memory headroom is the constraint (seed: favours HybridEP on Qwen3-Next)")
    p.add_argument("--num-experts", type=int, default=None, help="check that EP divides it (default: from the recipe named by --model)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (DeepEP/NCCL EP need TP x EP > 1)")
    p.add_argument("--backend", default="auto", help=f"force a backend: auto, {', '.join(BACKEND_IDS)}")
    p.add_argument("--assume-installed", default=None, metavar="LIST",
                   help="plan for another container: comma list of installed backends (deepep,hybridep,ncclep,permute-fusion), 'all' or 'none'; default: probe this machine")
    p.add_argument("--explain", action="store_true", help="also print pitfalls and recorded evidence")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def resolve_model_and_experts(card: Card, name: str, num_experts: int | None) -> tuple[str, int | None]:
    """Card family from a family alias or a recipe name; experts from the recipe when known."""
    from megatron_moe_probe import recipes as recipes_mod

    recipe = recipes_mod.find_recipe_quiet(name)
    try:
        fam = card.resolve_model(name)
    except UsageError as exc:
        if recipe is None:
            names = recipes_mod.recipe_names()
            raise UsageError(f"{exc}; recipe names: {', '.join(names)}") from None
        fam = recipe.model.family
    if num_experts is None and recipe is not None:
        num_experts = recipe.model.moe.num_experts
    return fam, num_experts


def build_query(args: argparse.Namespace, card: Card, detector: Callable[[], Detected] = detect_gpus) -> Query:
    fam, num_experts = resolve_model_and_experts(card, args.model, args.num_experts)
    topo = resolve_topology(card, args.hardware, args.gpus_per_node, args.nodes, args.nvlink_domain, detector)
    force = None if args.backend == "auto" else args.backend.lower()
    nodes = topo.nodes
    if args.nodes is None and topo.gpus_per_node and args.ep > 0:
        nodes = max(1, -(-args.ep // topo.gpus_per_node))
    return Query(
        hardware=topo.hardware, ep=args.ep, model=fam, stage=args.stage, gpus_per_node=topo.gpus_per_node,
        nodes=nodes, nvlink_domain=topo.nvlink_domain, precision=args.precision,
        memory_tight=args.memory_tight, num_experts=num_experts, tp=args.tp, force=force,
    )


def availability_from_args(card: Card, assume: str | None) -> Availability:
    return probe(card) if assume is None else assumed(card, parse_backend_list(assume))


def run(args: argparse.Namespace) -> int:
    card = default_card()
    q = build_query(args, card)
    rec = recommend(q, card, availability_from_args(card, args.assume_installed))
    if args.json:
        print(json.dumps(rec.to_dict(), indent=2, default=str))
    else:
        print(format_text(rec, card, explain=args.explain))
    return 0
