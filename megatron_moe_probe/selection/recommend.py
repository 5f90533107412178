"""Which MoE token dispatcher to use, why, and its exact flags (`moe-probe recommend`: commands/recommend.py).

The decision is the skill card's ordered rules (first match wins); this module builds
the facts the rules test (hardware, EP class, topology, model family, stage, precision),
applies the availability gate, and renders the flags. It never restates the card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.availability import Availability, probe
from megatron_moe_probe.selection.card import BACKEND_IDS, Card, Rule, default_card


@dataclass(frozen=True)
class Query:
    hardware: str                    # card hardware id
    ep: int
    model: str = "other"             # card model-family id
    stage: str = "performance"
    gpus_per_node: int | None = None
    nodes: int = 1
    nvlink_domain: int | None = None
    precision: str = "bf16"
    memory_tight: bool = False
    num_experts: int | None = None
    tp: int = 1
    force: str | None = None         # a backend id forced by the user/recipe


@dataclass
class FlagSet:
    backend: str
    megatron_lm: list[str]
    bridge: dict[str, Any]
    env: dict[str, str]
    bridge_perf_harness: str | None

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "megatron_lm": self.megatron_lm,
            "bridge_overrides": [f"{k}={_ov(v)}" for k, v in self.bridge.items()],
            "env": self.env,
            "bridge_perf_harness": self.bridge_perf_harness,
        }


@dataclass
class Recommendation:
    query: Query
    ep_class: str
    topology: str
    rule: Rule | None                # None when forced
    first_choice: str
    first_choice_available: bool
    use: str                         # what to run now (first choice, or its fallback)
    fallback: str | None
    also_measure: list[str]
    other_matching_rules: list[Rule]
    flags: dict[str, FlagSet]        # keyed by backend id: first choice and fallback
    availability: Availability
    warnings: list[str] = field(default_factory=list)
    cited_rows: list[str] = field(default_factory=list)

    @property
    def fallback_used(self) -> bool:
        return self.use != self.first_choice

    def to_dict(self) -> dict:
        return {
            "query": self.query.__dict__,
            "ep_class": self.ep_class,
            "topology": self.topology,
            "decided_by": {"rule": self.rule.id, "why": self.rule.why, "source": self.rule.source} if self.rule else {"rule": "forced", "why": "backend forced by the user", "source": "user"},
            "cited_rows": self.cited_rows,
            "other_matching_rules": [{"rule": r.id, "choose": r.choose} for r in self.other_matching_rules],
            "first_choice": self.first_choice,
            "first_choice_available": self.first_choice_available,
            "use": self.use,
            "fallback": self.fallback,
            "fallback_used": self.fallback_used,
            "also_measure": self.also_measure,
            "flags": {k: v.to_dict() for k, v in self.flags.items()},
            "availability": self.availability.to_dict(),
            "warnings": self.warnings,
        }


def _ov(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


# -- facts the rules test -----------------------------------------------------

def ep_class(card: Card, ep: int, nvlink_domain: int | None) -> str:
    c = card.ep_classes
    if ep == 1:
        return "none"
    if ep <= c.small_max and (nvlink_domain is None or ep <= nvlink_domain):
        return "small"
    if ep >= c.large_min:
        return "large"
    return "medium"


def topology_label(card: Card, q: Query) -> str:
    if q.ep == 1:
        return "no expert parallelism"
    hw = card.hardware_entry(q.hardware)
    if hw.nvl72 and q.nvlink_domain:
        return "inside an NVL72 domain" if q.ep <= q.nvlink_domain else "crosses NVL72 domains"
    if q.gpus_per_node:
        return "single node" if q.ep <= q.gpus_per_node else "crosses nodes"
    return "unknown topology"


def rule_matches(rule: Rule, q: Query, facts: dict[str, Any]) -> bool:
    w = rule.when
    checks = [
        w.stage is None or q.stage == w.stage,
        w.hardware is None or q.hardware in w.hardware,
        w.nvl72 is None or facts["nvl72"] == w.nvl72,
        w.model is None or q.model in w.model,
        w.ep_class is None or facts["ep_class"] in w.ep_class,
        w.ep_max is None or q.ep <= w.ep_max,
        w.precision is None or q.precision in w.precision,
        w.memory_tight is None or q.memory_tight == w.memory_tight,
    ]
    return all(checks)


def validate_query(card: Card, q: Query) -> None:
    if q.hardware not in card.hardware_ids:
        raise UsageError(f"unknown hardware {q.hardware!r}; allowed: {', '.join(card.hardware_ids)}")
    fams = [f.id for f in card.model_families]
    if q.model not in fams:
        raise UsageError(f"unknown model family {q.model!r}; allowed: {', '.join(fams)}")
    stages = [s.id for s in card.stages]
    if q.stage not in stages:
        raise UsageError(f"unknown stage {q.stage!r}; allowed: {', '.join(stages)}")
    if q.precision not in card.precisions:
        raise UsageError(f"unknown precision {q.precision!r}; allowed: {', '.join(card.precisions)}")
    if q.ep < 1:
        raise UsageError(f"--ep must be >= 1 (got {q.ep})")
    if q.tp < 1:
        raise UsageError(f"--tp must be >= 1 (got {q.tp})")
    if q.gpus_per_node is not None:
        world = q.gpus_per_node * q.nodes
        if q.ep > world:
            raise UsageError(
                f"EP={q.ep} is larger than the world ({q.nodes} node(s) x {q.gpus_per_node} GPUs = {world} GPUs)"
            )
    if q.num_experts is not None:
        if q.num_experts < 1:
            raise UsageError(f"--num-experts must be >= 1 (got {q.num_experts})")
        if q.num_experts % q.ep:
            divisors = [d for d in range(1, q.num_experts + 1) if q.num_experts % d == 0]
            raise UsageError(
                f"EP={q.ep} does not divide the {q.num_experts} experts; EP degrees that do: {', '.join(map(str, divisors))}"
            )
    if q.force is not None and q.force not in BACKEND_IDS:
        raise UsageError(f"unknown backend {q.force!r}; allowed: auto, {', '.join(BACKEND_IDS)}")


# -- flags ------------------------------------------------------------------------

def flag_set(card: Card, backend_id: str, q: Query, availability: Availability) -> FlagSet:
    b = card.backend(backend_id)
    mlm = list(b.megatron_lm_flags)
    bridge: dict[str, Any] = dict(b.bridge_overrides)
    if b.num_sms is not None and b.num_sms.default > 0:
        mlm += [card.flex_num_sms_flag, str(b.num_sms.default)]
        bridge[card.flex_num_sms_bridge_key] = b.num_sms.default
    pf = card.permute_fusion
    if availability.permute_fusion:
        mlm.append(pf.flag)
    bridge[pf.bridge_key] = availability.permute_fusion
    env: dict[str, str] = {}
    if "NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN" in b.env:
        ranks = q.ep if q.nvlink_domain is None else min(q.ep, q.nvlink_domain)
        env["NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN"] = str(ranks)
    return FlagSet(backend_id, mlm, bridge, env, b.bridge_perf_harness)


# -- the decision -----------------------------------------------------------------

def recommend(q: Query, card: Card | None = None, availability: Availability | None = None) -> Recommendation:
    card = card or default_card()
    validate_query(card, q)
    availability = availability or probe(card)
    hw = card.hardware_entry(q.hardware)
    facts = {"nvl72": hw.nvl72, "ep_class": ep_class(card, q.ep, q.nvlink_domain)}
    matching = [r for r in card.rules if rule_matches(r, q, facts)]
    warnings: list[str] = []

    if q.force is not None:
        status = availability.backends[q.force]
        if not status.available:
            raise UsageError(
                f"backend {q.force!r} was forced but is not installed here: {status.detail}. "
                f"Install it, drop the forced backend, or plan for another container with --assume-installed {q.force}"
            )
        if q.force in ("deepep", "ncclep") and q.tp * q.ep <= 1:
            raise UsageError(f"backend {q.force!r} needs tensor-parallel x expert-parallel > 1 (Megatron asserts); got TP={q.tp}, EP={q.ep}")
        rule, first = None, q.force
        also: list[str] = []
        others = matching
        if matching and matching[0].choose != q.force:
            warnings.append(f"forced {q.force!r}; the card's rule {matching[0].id!r} would choose {matching[0].choose!r}")
    else:
        if not matching:  # the card ends with catch-all hardware rules; reaching here is a card bug
            raise UsageError(f"no card rule matches {q}; the card needs a catch-all rule")
        rule, first = matching[0], matching[0].choose
        also = list(rule.also_measure)
        others = matching[1:]

    first_ok = availability.is_available(first)
    fb = card.fallback[first]
    use = first
    if not first_ok:
        if fb is None or not availability.is_available(fb):
            raise UsageError(f"neither {first!r} nor its fallback {fb!r} is available: {availability.backends[first].detail}")
        use = fb
        warnings.append(
            f"{card.backend(first).label} is NOT INSTALLED here ({availability.backends[first].detail}); "
            f"use the fallback `{fb}` now and record the missing package as an environment limitation, "
            "not as performance data"
        )
    for m in also:
        if not availability.is_available(m):
            warnings.append(f"also-measure candidate {card.backend(m).label} is not installed here")
    if card.backend(use).flex_backend in ("deepep", "ncclep") and q.tp * q.ep <= 1:
        warnings.append(f"{use} needs TP x EP > 1")
    flags = {first: flag_set(card, first, q, availability)}
    if fb is not None:
        flags[fb] = flag_set(card, fb, q, availability)
    if not availability.permute_fusion:
        warnings.append(f"permute fusion off: {availability.permute_fusion_detail}")
    cited = list(rule.cites) if rule else []
    return Recommendation(
        query=q,
        ep_class=facts["ep_class"],
        topology=topology_label(card, q),
        rule=rule,
        first_choice=first,
        first_choice_available=first_ok,
        use=use,
        fallback=fb,
        also_measure=also,
        other_matching_rules=others,
        flags=flags,
        availability=availability,
        warnings=warnings,
        cited_rows=cited,
    )


# -- text rendering ---------------------------------------------------------------

def format_text(rec: Recommendation, card: Card, explain: bool = False) -> str:
    q = rec.query
    L: list[str] = []
    label = lambda b: card.backend(b).label  # noqa: E731
    L.append(f"Dispatcher: {label(rec.use)}" + ("" if not rec.fallback_used else f"   (first choice {label(rec.first_choice)} is NOT INSTALLED: fallback)"))
    L.append(f"  first choice : {label(rec.first_choice)}  [{'installed' if rec.first_choice_available else 'NOT INSTALLED'}]")
    if rec.fallback:
        L.append(f"  fallback     : {label(rec.fallback)}  (used when {label(rec.first_choice)} is not installed)")
    if rec.also_measure:
        L.append(f"  also measure : {', '.join(label(b) for b in rec.also_measure)}")
    L.append("")
    L.append("Why")
    L.append(
        f"  inputs: hardware={q.hardware} ep={q.ep} ({rec.ep_class} EP, {rec.topology}) model={q.model} "
        f"stage={q.stage} precision={q.precision}" + (" memory-tight" if q.memory_tight else "")
        + (f" nodes={q.nodes} gpus/node={q.gpus_per_node}" if q.gpus_per_node else "")
        + (f" nvlink-domain={q.nvlink_domain}" if q.nvlink_domain else "")
    )
    if rec.rule is None:
        L.append(f"  forced: --backend {q.force}")
    else:
        L.append(f"  decided by card rule '{rec.rule.id}' [{rec.rule.source}]: {rec.rule.why}")
        for ref in rec.cited_rows:
            row = card.table_row(ref)
            text = getattr(row, "text", "")
            L.append(f"    seed table row {ref}: {text}")
    for r in rec.other_matching_rules[:4]:
        agree = "agrees" if r.choose == rec.first_choice else f"would choose {label(r.choose)}"
        L.append(f"  also matches '{r.id}' ({agree})")
    L.append("")
    L.append("Availability gate (" + rec.availability.source + ")")
    for b in (rec.first_choice, rec.fallback, *rec.also_measure):
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
    if rec.warnings:
        L.append("")
        L.append("Warnings")
        L.extend(f"  ! {w}" for w in rec.warnings)
    if rec.fallback_used or explain:
        L.append("")
        L.append("Pitfalls" if explain else "Pitfall")
        for p in card.pitfalls:
            if explain or p.id == "import-failure":
                L.append(f"  - {p.text}")
    if explain:
        L.append("")
        L.append("Recorded evidence")
        for e in card.evidence:
            L.append(f"  - {e.id} [{e.source}]: {e.what} ({e.model})")
    return "\n".join(L)
