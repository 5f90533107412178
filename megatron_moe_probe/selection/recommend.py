"""The dispatcher decision: candidates, a measured winner or the A/B that decides, final flags.

`recommend(Query)` is pure: it reads the skill card, applies the availability gate and
returns a `Recommendation` whose flags are final (permute fusion on/off, SM count,
CUDA_DEVICE_MAX_CONNECTIONS, HybridEP's ranks per NVLink domain), so callers such as
the recipes only ask and never edit them. It never restates the card and never imports
the recipes; the `moe-probe recommend` command (arguments, recipes, text, JSON) lives in
`commands/recommend.py`.

Order of the answer, as the card says ("Hardware narrows the candidate set; it does not
select the winner"):
  1. EP=1 or bring-up: the bring-up path of the hardware row.
  2. A measured winner for the same model, hardware, GPU count and EP: named first.
  3. Otherwise the current (not superseded) card rule names the lead candidate and the
     matched A/B of the installed candidates decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.selection.availability import Availability, detect_backends
from megatron_moe_probe.selection.card import BACKEND_IDS, Card, Measured, Rule, default_card

Decision = Literal["forced", "ep-one", "bring-up", "measured-winner", "ab-decides"]


@dataclass(frozen=True)
class Query:
    """The typed request: the facts the card tests plus the knobs that make the flags final."""
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
    cp: int = 1
    force: str | None = None         # a backend id forced by the user/recipe
    permute_fusion: str = "auto"     # auto (the gate decides), on (error when unavailable), off
    num_sms: int | None = None       # flex SM count; None: the card's default for the backend
    ep_overlap: bool = False         # --overlap-moe-expert-parallel-comm
    cuda_graphs: bool = False

    @property
    def world(self) -> int | None:
        return None if self.gpus_per_node is None else self.gpus_per_node * self.nodes


DispatcherRequest = Query


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


@dataclass(frozen=True)
class CandidateInfo:
    backend: str
    reason: str
    installed: bool
    role: str                        # 'baseline' (bring-up path) or 'candidate'

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Recommendation:
    query: Query
    ep_class: str
    topology: str
    decision: Decision
    rule: Rule | None                # the lead-candidate rule; None when forced or a winner decided
    first_choice: str
    first_choice_available: bool
    use: str                         # what to run now (first choice, or its fallback)
    fallback: str | None
    bring_up: str
    candidates: list[CandidateInfo]
    winner: Measured | None
    evidence: list[Measured]
    history: list[Rule]              # superseded rules that would have matched
    other_matching_rules: list[Rule]
    flags: dict[str, FlagSet]        # keyed by backend id: first choice and fallback
    availability: Availability
    warnings: list[str] = field(default_factory=list)
    cited_rows: list[str] = field(default_factory=list)
    plan: dict | None = None         # the A/B plan (selection/plan.py), when asked for

    @property
    def fallback_used(self) -> bool:
        return self.use != self.first_choice

    @property
    def also_measure(self) -> list[str]:
        return [c.backend for c in self.candidates if c.role == "candidate" and c.backend != self.first_choice]

    @property
    def ab_backends(self) -> list[str]:
        """The installed backends the A/B runs: the bring-up baseline first, then the candidates."""
        return [c.backend for c in self.candidates if c.installed]

    def to_dict(self) -> dict:
        if self.decision == "forced":
            decided = {"rule": "forced", "why": "backend forced by the user", "source": "user"}
        elif self.decision == "measured-winner":
            decided = {"rule": f"measured:{self.winner.id}", "why": "measured winner for this model, hardware and scale",
                       "source": self.winner.source, "date": self.winner.date}
        else:
            decided = {"rule": self.rule.id, "why": self.rule.why, "source": self.rule.source, "date": self.rule.date}
        return {
            "query": self.query.__dict__,
            "ep_class": self.ep_class,
            "topology": self.topology,
            "decision": self.decision,
            "decided_by": decided,
            "bring_up": self.bring_up,
            "winner": measured_dict(self.winner) if self.winner else None,
            "candidates": [c.to_dict() for c in self.candidates],
            "evidence": [measured_dict(m) for m in self.evidence],
            "history": [{"rule": r.id, "choose": r.choose, "why": r.why, "source": r.source, "date": r.date,
                         "superseded_by": r.superseded_by} for r in self.history],
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
            "plan": self.plan,
            "warnings": self.warnings,
        }


def measured_dict(m: Measured) -> dict:
    return {"id": m.id, "role": m.role, "model": m.model, "model_label": m.model_label, "hardware": m.hardware,
            "gpus": m.gpus, "ep": m.ep, "parallelism": m.parallelism, "backend": m.backend,
            "precision": m.precision_detail, "tflops_per_gpu": m.tflops_per_gpu, "tflops_approx": m.tflops_approx,
            "step_time_s": m.step_time_s, "num_sms": m.num_sms, "note": m.note, "source": m.source, "date": m.date,
            "ref": m.ref}


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
    if q.tp < 1 or q.cp < 1:
        raise UsageError(f"--tp and --cp must be >= 1 (got TP={q.tp}, CP={q.cp})")
    if q.permute_fusion not in ("auto", "on", "off"):
        raise UsageError(f"unknown permute_fusion {q.permute_fusion!r}; allowed: auto, on, off")
    if q.num_sms is not None and q.num_sms < 1:
        raise UsageError(f"num_sms must be >= 1 (got {q.num_sms})")
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

def ranks_per_nvlink_domain(ep: int, nvlink_domain: int | None) -> int:
    """The EP ranks in one NVLink domain: the largest divisor of EP that fits in a domain
    (the EP group splits evenly over domains; EP itself when the domain is unknown)."""
    if nvlink_domain is None or ep <= nvlink_domain:
        return ep
    return max(d for d in range(1, nvlink_domain + 1) if ep % d == 0)


def max_connections(card: Card, q: Query) -> tuple[str, str] | None:
    """(value, why) of the card's first CUDA_DEVICE_MAX_CONNECTIONS row that matches, or None."""
    arch = card.hardware_entry(q.hardware).arch
    facts = {"ep_overlap": q.ep_overlap, "cuda_graphs": q.cuda_graphs, "model_parallel": q.tp > 1 or q.cp > 1}
    for row in card.cuda_device_max_connections:
        w = row.when
        if all(getattr(w, k) is None or getattr(w, k) == v for k, v in facts.items()) and (w.arch is None or arch in w.arch):
            return row.value, row.why
    return None


def flag_set(card: Card, backend_id: str, q: Query, availability: Availability) -> FlagSet:
    """The final flags for one backend: nothing for the caller to add, drop or rewrite."""
    b = card.backend(backend_id)
    mlm = list(b.megatron_lm_flags)
    bridge: dict[str, Any] = dict(b.bridge_overrides)
    if b.dispatcher_type == "flex":
        sms = q.num_sms if q.num_sms is not None else (b.num_sms.default if b.num_sms and b.num_sms.default > 0 else None)
        if sms is not None:
            mlm += [card.flex_num_sms_flag, str(sms)]
            bridge[card.flex_num_sms_bridge_key] = sms
    pf = card.permute_fusion
    fusion = {"auto": availability.permute_fusion, "on": True, "off": False}[q.permute_fusion]
    if fusion:
        mlm.append(pf.flag)
    bridge[pf.bridge_key] = fusion
    env: dict[str, str] = {}
    if "NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN" in b.env:
        env["NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN"] = str(ranks_per_nvlink_domain(q.ep, q.nvlink_domain))
    conn = max_connections(card, q)
    if conn is not None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = conn[0]
    return FlagSet(backend_id, mlm, bridge, env, b.bridge_perf_harness)


# -- the decision -----------------------------------------------------------------

def find_winner(card: Card, q: Query) -> Measured | None:
    """The measured winner for the same model, hardware, precision, GPU count and EP."""
    for m in card.measured:
        if (m.role == "winner" and m.model == q.model and m.hardware == q.hardware and m.ep == q.ep
                and m.precision == q.precision and (q.world is None or m.gpus == q.world)):
            return m
    return None


def evidence_rows(card: Card, q: Query) -> list[Measured]:
    """Measured rows that bear on the query: same model and hardware first, then same model, then same hardware."""
    same = lambda m: (m.model == q.model, m.hardware == q.hardware)  # noqa: E731
    rows = [m for m in card.measured if any(same(m))]
    return sorted(rows, key=lambda m: (not all(same(m)), m.model != q.model))


def recommend(q: Query, card: Card | None = None, availability: Availability | None = None) -> Recommendation:
    card = card or default_card()
    validate_query(card, q)
    availability = availability or detect_backends(card)
    hw = card.hardware_entry(q.hardware)
    hw_row = card.hardware_row(q.hardware)
    facts = {"nvl72": hw.nvl72, "ep_class": ep_class(card, q.ep, q.nvlink_domain)}
    matching = [r for r in card.current_rules if rule_matches(r, q, facts)]
    history = [r for r in card.rules if r.superseded_by is not None and rule_matches(r, q, facts)]
    warnings: list[str] = []
    winner = None
    rule: Rule | None = None

    if q.force is not None:
        status = availability.backends[q.force]
        if not status.available:
            raise UsageError(
                f"backend {q.force!r} was forced but is not installed here: {status.detail}. "
                f"Install it, drop the forced backend, or plan for another container with --assume-installed {q.force}"
            )
        if q.force in ("deepep", "ncclep") and q.tp * q.ep <= 1:
            raise UsageError(f"backend {q.force!r} needs tensor-parallel x expert-parallel > 1 (Megatron asserts); got TP={q.tp}, EP={q.ep}")
        decision, first, others = "forced", q.force, matching
        if matching and matching[0].choose != q.force:
            warnings.append(f"forced {q.force!r}; the card's rule {matching[0].id!r} would lead with {matching[0].choose!r}")
    else:
        if not matching:  # the card ends with catch-all hardware rules; reaching here is a card bug
            raise UsageError(f"no card rule matches {q}; the card needs a catch-all rule")
        rule, others = matching[0], matching[1:]
        if q.ep == 1:
            decision, first = "ep-one", rule.choose
        elif q.stage == "bring-up":
            decision, first = "bring-up", hw_row.bring_up
        else:
            winner = find_winner(card, q)
            if winner is not None:
                decision, first = "measured-winner", winner.backend
            else:
                decision, first = "ab-decides", rule.choose

    # Candidates: the bring-up baseline, then (performance) the lead, the hardware row's tuned set and the rule's extras.
    reasons: dict[str, str] = {}
    if decision in ("measured-winner", "ab-decides", "forced") and q.ep > 1:
        if winner is not None:
            reasons[winner.backend] = f"measured winner: {winner.model_label} on {winner.gpus}×{winner.hardware}, " \
                                      f"{winner.tflops_per_gpu:g} TFLOP/s/GPU ({winner.source}, {winner.date})"
        elif rule is not None and rule.choose != hw_row.bring_up:
            reasons[rule.choose] = f"lead candidate, card rule '{rule.id}' ({rule.source}, {rule.date}): {rule.why}"
        for c in hw_row.tuned:
            reasons.setdefault(c.backend, f"{hw_row.row} candidate ({hw_row.source}, {hw_row.date}): {c.reason}")
        for b in (rule.also_measure if rule else []):
            reasons.setdefault(b, f"also measure, card rule '{rule.id}' ({rule.source}, {rule.date})")
        if q.force is not None:
            reasons.setdefault(q.force, "forced by the user")
    base = hw_row.bring_up
    cands = [CandidateInfo(base, f"bring-up path and correctness baseline ({hw_row.source}, {hw_row.date})",
                           availability.is_available(base), "baseline")]
    for b, why in reasons.items():
        if b == base:
            continue
        if b in ("deepep", "ncclep") and q.tp * q.ep <= 1:
            continue
        cands.append(CandidateInfo(b, why, availability.is_available(b), "candidate"))

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
    for c in cands:
        if c.role == "candidate" and not c.installed and c.backend != first:
            warnings.append(f"candidate {card.backend(c.backend).label} is not installed here: left out of the A/B "
                            "(an environment limitation)")
    if q.num_sms is not None and card.backend(use).dispatcher_type != "flex":
        raise UsageError(f"num_sms only applies to flex backends, resolved backend is {use!r}")
    if q.permute_fusion == "on" and not availability.permute_fusion:
        raise UsageError(f"permute fusion is 'on' but {availability.permute_fusion_detail}")
    # A measured winner's SM count is its measured setting (unless the request sets one).
    q_first = replace(q, num_sms=winner.num_sms) if winner and winner.num_sms and q.num_sms is None else q
    flags = {first: flag_set(card, first, q_first, availability)}
    if fb is not None:
        flags[fb] = flag_set(card, fb, q, availability)
    if q.permute_fusion == "auto" and not availability.permute_fusion:
        warnings.append(f"permute fusion off: {availability.permute_fusion_detail}")
    for r in history[:1]:  # the most specific earlier rule; the rest are in `history`
        newer = next(x for x in card.rules if x.id == r.superseded_by)
        if r.choose != first:
            warnings.append(f"earlier evidence: rule '{r.id}' ({r.source}, {r.date}) said {card.backend(r.choose).label}; "
                            f"superseded by '{newer.id}' ({newer.source}, {newer.date})")
    cited = list(rule.cites) if rule and decision != "forced" else []
    return Recommendation(
        query=q, ep_class=facts["ep_class"], topology=topology_label(card, q), decision=decision,
        rule=rule if decision != "forced" else None, first_choice=first, first_choice_available=first_ok,
        use=use, fallback=fb, bring_up=base, candidates=cands, winner=winner, evidence=evidence_rows(card, q),
        history=history, other_matching_rules=others, flags=flags, availability=availability,
        warnings=warnings, cited_rows=cited,
    )


