"""`moe-probe recommend`: the command around selection.recommend (arguments, recipes, text, JSON).

The decision is selection/recommend.py and the A/B plan selection/plan.py; this module reads
the command line and prints. It is the only recommend code that knows about recipes: it turns
`--model` (a card family alias or a recipe name) into a family and an expert count, finds the
recipe (and variant) that matches the query's parallelism for the A/B command, and renders
the answer.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Callable

from megatron_moe_probe.commands import print_json
from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.availability import availability_for
from megatron_moe_probe.selection.card import BACKEND_IDS, Card, default_card
from megatron_moe_probe.selection.hardware import Detected, detect_gpus, resolve_topology
from megatron_moe_probe.selection.plan import ab_plan
from megatron_moe_probe.selection.recommend import Query, Recommendation, _ov, recommend


def format_text(rec: Recommendation, card: Card, explain: bool = False) -> str:
    q = rec.query
    L: list[str] = []
    label = lambda b: card.backend(b).label  # noqa: E731
    L.append(f"Dispatcher: {label(rec.use)}" + ("" if not rec.fallback_used else f"   (first choice {label(rec.first_choice)} is NOT INSTALLED: fallback)"))
    L.append(f"  decision     : {rec.decision}")
    L.append(f"  bring-up     : {label(rec.bring_up)}")
    if rec.winner is not None:
        w = rec.winner
        L.append(f"  measured winner: {label(w.backend)}: {w.model_label} on {w.gpus}×{w.hardware} {w.parallelism}, "
                 f"{w.tflops_per_gpu:g} TFLOP/s/GPU" + (f", {w.step_time_s:g} s/step" if w.step_time_s else "")
                 + f" [{w.source}, {w.date}]")
    elif rec.decision == "ab-decides":
        L.append(f"  no measured winner for this model, hardware and scale: the A/B decides; lead candidate {label(rec.first_choice)}")
        if rec.near_miss:
            L.append("  " + near_miss_text(rec.near_miss, card))
    L.append(f"  first choice : {label(rec.first_choice)}  [{'installed' if rec.first_choice_available else 'NOT INSTALLED'}]")
    if rec.fallback:
        L.append(f"  fallback     : {label(rec.fallback)}  (used when {label(rec.first_choice)} is not installed)")
    if len(rec.candidates) > 1:
        L.append("")
        L.append("Candidates")
        for c in rec.candidates:
            L.append(f"  {label(c.backend):28s} {c.role:9s} {'installed' if c.installed else 'NOT INSTALLED'}  {c.reason}")
    if rec.evidence and q.stage == "performance":
        L.append("")
        L.append("Measured rows")
        for m in rec.evidence:
            tf = "-" if m.tflops_per_gpu is None else ("~" if m.tflops_approx else "") + f"{m.tflops_per_gpu:g}"
            shape = (f" mb{m.micro_batch}" if m.micro_batch else "") + (f" {m.interconnect}" if m.interconnect else "")
            vs = "".join(f"; {label(b)} {t:g} s" for b, t in m.versus.items())
            st = f", {m.step_time_s:g} s/step{vs}" if m.step_time_s else ""
            L.append(f"  {m.model_label} on {m.gpus}×{m.hardware} {m.parallelism}{shape}: {label(m.backend)}, {tf} TFLOP/s/GPU"
                     f"{st}, {m.role} [{m.source}, {m.date}" + (f", {m.ref}" if m.source == "public" and m.ref else "") + "]")
    L.append("")
    L.append("Why")
    L.append(
        f"  inputs: hardware={q.hardware} ep={q.ep} ({rec.ep_class} EP, {rec.topology}) model={q.model} "
        f"stage={q.stage} precision={q.precision}" + (" memory-tight" if q.memory_tight else "")
        + (f" micro-batch={q.micro_batch}" if q.micro_batch else "") + (f" interconnect={q.interconnect}" if q.interconnect else "")
        + (f" nodes={q.nodes} gpus/node={q.gpus_per_node}" if q.gpus_per_node else "")
        + (f" nvlink-domain={q.nvlink_domain}" if q.nvlink_domain else "")
    )
    if rec.decision == "forced":
        L.append(f"  forced: --backend {q.force}")
    elif rec.rule is not None:
        L.append(f"  card rule '{rec.rule.id}' [{rec.rule.source}, {rec.rule.date}"
                 + (f", {rec.rule.ref}" if rec.rule.ref else "") + f"]: {rec.rule.why}")
        for ref in rec.cited_rows:
            row = card.table_row(ref)
            L.append(f"    table row {ref}: {row.text} [{row.source}, {row.date}]")
    for r in rec.history:
        L.append(f"  earlier: rule '{r.id}' [{r.source}, {r.date}] led with {label(r.choose)}; superseded by '{r.superseded_by}'")
    for r in rec.other_matching_rules[:4]:
        agree = "agrees" if r.choose == rec.first_choice else f"would lead with {label(r.choose)}"
        L.append(f"  also matches '{r.id}' ({agree})")
    L.append("")
    L.append("Availability gate (" + rec.availability.source + ")")
    for b in dict.fromkeys([rec.first_choice, rec.fallback, *[c.backend for c in rec.candidates]]):
        if b is None:
            continue
        st = rec.availability.backends[b]
        L.append(f"  {label(b):28s} {'ok' if st.available else 'MISSING'}  {st.detail}")
    L.append(f"  {'permute fusion':28s} {'ok' if rec.availability.permute_fusion else 'off'}  {rec.availability.permute_fusion_detail}")
    for b, fs in rec.flags.items():
        L.append("")
        tag = "first choice" if b == rec.first_choice else "fallback"
        L.append(f"Flags for {label(b)} ({tag})")
        L.append("  Megatron-LM    : " + " ".join(fs.megatron_lm))
        L.append("  Megatron-Bridge: " + " ".join(f"{k}={_ov(v)}" for k, v in fs.bridge.items()))
        if fs.bridge_perf_harness:
            L.append("  Bridge perf    : " + fs.bridge_perf_harness)
        for k, v in fs.env.items():
            L.append(f"  env            : {k}={v}")
    if rec.run is not None:
        L.append("")
        L.append("Your run (" + rec.run["path"] + ")")
        L.extend(f"  {line}" for line in rec.run["reasoning"])
    if rec.cautions:
        L.append("")
        L.append("Cautions (card pitfalls for this query)")
        for c in rec.cautions:
            L.append(f"  - {c['text']} [{c['source']}, {c['date']}" + (f", {c['ref']}" if c["ref"] else "") + "]"
                     + ("" if c["verified"] else f" (unverified: {c['verify_note']})"))
    if rec.correctness_checks:
        L.append("")
        L.append(f"Before trusting a dispatcher at EP={q.ep}")
        for c in rec.correctness_checks:
            L.append(f"  - {c['check']}: {c['because']} [{c['source']}, {c['date']}, {c['ref']}]")
    if rec.new_dispatchers:
        L.append("")
        L.append("Not in Megatron-Core 0.19, but fits this query")
        for d in rec.new_dispatchers:
            L.append(f"  - {d['label']} ({d['where']}): {d['what']}; limits: {'; '.join(d['limits'])} [{d['source']}, {d['date']}]")
    if rec.plan is not None:
        p = rec.plan
        L.append("")
        L.append("A/B plan: " + p["decides"])
        L.append("  " + p["shell"])
        L.append("  check it first (CPU, trains nothing): " + shlex.join(p["dry_run_command"]))
        for line in p.get("multi_node", []):
            L.append("  " + line)
        L.append("  held fixed: " + ", ".join(p["held_fixed"]))
        L.append("  benchmark-only: " + p["benchmark_only"]["disclosure"])
        if p["not_installed"]:
            L.append("  left out (not installed, an environment limitation): " + ", ".join(p["not_installed"]))
        L.extend(f"  note: {n}" for n in p["notes"])
    if rec.warnings:
        L.append("")
        L.append("Warnings")
        L.extend(f"  ! {w}" for w in rec.warnings)
    if rec.fallback_used and rec.availability.source == "probed" and not _has_gpu():
        L.append(f"  ! this machine has no GPU: to plan for the GPU machine, pass --assume-installed "
                 f"{rec.first_choice} (or the comma list of what its container has)")
    if rec.fallback_used or explain:
        L.append("")
        L.append("Pitfalls" if explain else "Pitfall")
        for p in card.pitfalls:
            if explain or p.id == "import-failure":
                L.append(f"  - {p.text}")
    if explain:
        L.append("")
        L.append("Known limitations")
        L.extend(f"  - {lim.text} [{lim.source}, {lim.date}]" for lim in card.known_limitations)
        L.append("")
        L.append("Recorded evidence")
        for e in card.evidence:
            L.append(f"  - {e.id} [{e.source}, {e.date}" + (f", {e.ref}" if e.ref else "") + f"]: {e.what} ({e.model})")
    return "\n".join(L)


def near_miss_text(miss: dict, card: Card) -> str:
    diffs = ", ".join(f"{d['field']} ({d['row']} in the row, " + ("not given" if d["query"] is None else f"{d['query']} asked")
                      + (f": pass --{d['field'].replace('_', '-')}" if d["query"] is None else "") + ")"
                      for d in miss["mismatched"])
    return (f"closest measured winner: {miss['row']} ({card.backend(miss['backend']).label}, {miss['source']}, "
            f"{miss['date']}) differs in {diffs}")


def fill_args(args: argparse.Namespace, facts: dict) -> None:
    """The run's question where the command line left a field at its default."""
    q = facts["question"]
    if args.ep is None:
        args.ep = q["ep"]
    if args.hardware == "auto" and q["hardware"]:
        args.hardware = q["hardware"]
    if args.gpus_per_node is None and q["gpus_per_node"]:
        args.gpus_per_node = q["gpus_per_node"]
    if args.nodes is None and q["world"] and q["gpus_per_node"]:
        args.nodes = max(1, q["world"] // q["gpus_per_node"])
    if args.micro_batch is None:
        args.micro_batch = q["micro_batch"]
    if args.tp == 1 and q["tp"]:
        args.tp = q["tp"]
    if args.precision == "bf16":
        args.precision = q["precision"]
    if args.num_experts is None:
        args.num_experts = q["num_experts"]


def _has_gpu() -> bool:
    return detect_gpus().ok


def add_arguments(p: argparse.ArgumentParser) -> None:
    card = default_card()
    p.add_argument("--hardware", default="auto", help=f"auto (NVML / nvidia-smi) or one of: {', '.join(card.hardware_ids)}")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (required unless --run gives it)")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="a recorded run folder (the probe's, or an imported Megatron dump): the question comes from its "
                        "meta where present (flags given here win), and the answer reasons with its measured routing")
    p.add_argument("--micro-batch", type=int, default=None, help="micro-batch size (the EFA A/Bs flip with it)")
    p.add_argument("--interconnect", default=None, choices=list(card.interconnects),
                   help="the fabric between nodes (or nvlink for one NVLink domain); some evidence depends on it")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: detected, else the card's value for the hardware")
    p.add_argument("--nodes", type=int, default=None, help="default: the fewest nodes that hold the EP group")
    p.add_argument("--nvlink-domain", type=int, default=None, help="GPUs per NVLink domain (default: node for HGX, 72 for NVL72)")
    p.add_argument("--model", default="other", help="model family or recipe name (e.g. qwen3-30b-a3b, deepseek-v3, vlm, other)")
    p.add_argument("--recipe", default=None, help="recipe NAME[:VARIANT] for the A/B command (default: the recipe of --model whose parallelism matches)")
    p.add_argument("--stage", default="performance", choices=[s.id for s in card.stages])
    p.add_argument("--precision", default="bf16", choices=list(card.precisions))
    p.add_argument("--memory-tight", action="store_true", help="memory headroom is the constraint (favours HybridEP on Qwen3-Next)")
    p.add_argument("--num-experts", type=int, default=None, help="check that EP divides it (default: from the recipe named by --model)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (DeepEP/NCCL EP need TP x EP > 1)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel degree (CUDA_DEVICE_MAX_CONNECTIONS before Blackwell)")
    p.add_argument("--ep-overlap", action="store_true", help="the run uses --overlap-moe-expert-parallel-comm")
    p.add_argument("--cuda-graphs", action="store_true", help="the run uses CUDA graphs")
    p.add_argument("--backend", default="auto", help=f"force a backend: auto, {', '.join(BACKEND_IDS)}")
    p.add_argument("--assume-installed", default=None, metavar="LIST",
                   help="plan for another container: comma list of installed backends (deepep,hybridep,ncclep,permute-fusion), 'all' or 'none'; default: probe this machine")
    p.add_argument("--ab-out", default=None, metavar="DIR", help="output folder in the printed A/B command (default runs/ab-RECIPE)")
    p.add_argument("--explain", action="store_true", help="also print pitfalls, known limitations and recorded evidence")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _recipes():
    from megatron_moe_probe import recipes

    return recipes


def resolve_model_and_experts(card: Card, name: str, num_experts: int | None) -> tuple[str, int | None]:
    """Card family from a family alias or a recipe name; experts from the recipe when known."""
    recipes = _recipes()
    recipe = recipes.find_recipe_quiet(name)
    try:
        fam = card.resolve_model(name)
    except UsageError as exc:
        if recipe is None:
            raise UsageError(f"{exc}; recipe names: {', '.join(recipes.recipe_names())}") from None
        fam = recipe.model.family
    if num_experts is None and recipe is not None:
        num_experts = recipe.model.moe.num_experts
    return fam, num_experts


def matching_recipe(q: Query, model_name: str) -> tuple[str | None, list[str]]:
    """The recipe NAME[:VARIANT] whose model, hardware and parallelism match the query, and notes."""
    recipes = _recipes()
    base = recipes.find_recipe_quiet(model_name)
    names = [base.name] if base is not None else []
    if not names:  # a family alias: the recipes of that family
        for spec in recipes.recipe_names():
            r = recipes.find_recipe_quiet(spec)
            if r is not None and r.model.family == q.model:
                names.append(r.name)
    specs = [s for s in recipes.all_recipe_specs() if s.split(":")[0] in names]
    for spec in specs:
        r = recipes.load_recipe(spec)
        p = r.parallelism
        if (r.dispatcher.hardware == q.hardware and p.ep == q.ep and p.tp == q.tp and p.nodes == q.nodes
                and (q.gpus_per_node is None or p.gpus_per_node == q.gpus_per_node)):
            return spec, []
    if names:
        return None, [f"no variant of recipe(s) {', '.join(names)} has hardware {q.hardware}, EP={q.ep}, TP={q.tp}, "
                      f"{q.nodes} node(s): add one, or pass --recipe"]
    return None, []


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
        memory_tight=args.memory_tight, num_experts=num_experts, tp=args.tp, cp=getattr(args, "cp", 1), force=force,
        ep_overlap=getattr(args, "ep_overlap", False), cuda_graphs=getattr(args, "cuda_graphs", False),
        micro_batch=getattr(args, "micro_batch", None), interconnect=getattr(args, "interconnect", None),
    )


def answer(args: argparse.Namespace, card: Card, detector: Callable[[], Detected] = detect_gpus) -> Recommendation:
    """The full answer of `moe-probe recommend`: the decision plus, at performance, the A/B plan."""
    run_facts = None
    if getattr(args, "run", None):
        from megatron_moe_probe.selection import from_run

        run_facts = from_run.read_run(args.run)
        fill_args(args, run_facts)
    if args.ep is None:
        raise UsageError("--ep is required (or --run RUN, whose records give it)")
    q = build_query(args, card, detector)
    rec = recommend(q, card, availability_for(card, args.assume_installed))
    if args.recipe is not None:
        _recipes().load_recipe(args.recipe)  # a typo fails here, not in the printed command
        recipe, notes = args.recipe, []
    else:
        recipe, notes = matching_recipe(q, args.model)
    rec.plan = ab_plan(card, rec, recipe, args.assume_installed, getattr(args, "ab_out", None))
    if rec.plan is not None:
        rec.plan["notes"] = notes + rec.plan["notes"]
    if run_facts is not None:
        from megatron_moe_probe.selection import from_run

        rec.run = from_run.reason(card, rec, run_facts)
    return rec


def run(args: argparse.Namespace) -> int:
    card = default_card()
    rec = answer(args, card)
    if args.json:
        print_json(rec.to_dict())  # strict JSON
    else:
        print(format_text(rec, card, explain=args.explain))
    return 0
