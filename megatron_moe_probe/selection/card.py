"""The dispatcher-selection skill card: schema, loading, and SKILL.md table rendering.

The card (`megatron_moe_probe/resources/card.yaml`, copied byte for byte to
`skills/perf-moe-dispatcher-selection/card.yaml`) is data; this module only
validates it and offers lookups. The decision itself lives in the card's ordered
`rules`; `recommend.py` evaluates them.

`python -m megatron_moe_probe.selection.card --write-skill` regenerates the tables
between the `<!-- card:... -->` markers in SKILL.md (the prose stays hand-written).
"""

from __future__ import annotations

import argparse
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record import atomic_write_text
from megatron_moe_probe.yaml_io import package_data, read_yaml

BackendId = Literal["alltoall", "allgather", "deepep", "hybridep", "ncclep"]
BACKEND_IDS: tuple[str, ...] = ("alltoall", "allgather", "deepep", "hybridep", "ncclep")
Source = Literal["seed", "seed-upstream", "bridge", "megatron", "project", "public"]
# The interconnect a query names (inputs where the evidence depends on it: the AWS EFA A/Bs,
# Bridge's Spectrum-X NCCL EP failure). None in a query means "not given".
Interconnect = Literal["nvlink", "infiniband", "efa", "spectrum-x"]
INTERCONNECTS: tuple[str, ...] = ("nvlink", "infiniband", "efa", "spectrum-x")
# YYYY-MM or YYYY-MM-DD: comparable as strings, so "later evidence decides" is a string compare.
Date = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}(-\d{2})?$")]

# The card the code reads ships inside the package. The skill folder keeps a byte-identical
# copy for agents that read the skill on its own (tests/test_layout.py checks the two match).
CARD_PATH = package_data("card.yaml")
# Checkout-only files, rewritten by `--write-skill` (a maintenance step, never run from a wheel).
REPO_ROOT = Path(__file__).resolve().parents[2]
SKILL_DIR = REPO_ROOT / "skills" / "perf-moe-dispatcher-selection"
SKILL_CARD_COPY = SKILL_DIR / "card.yaml"
SKILL_MD_PATH = SKILL_DIR / "SKILL.md"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Requirement(_Strict):
    module: str
    attrs: list[str] = []
    distribution: str
    install: str


class NumSms(_Strict):
    default: int
    harness: int | None = None
    sweep: list[int] | None = None
    source: Source
    date: Date


class Backend(_Strict):
    id: BackendId
    label: str
    dispatcher_type: Literal["alltoall", "allgather", "flex"]
    flex_backend: Literal["deepep", "hybridep", "ncclep"] | None
    requires: list[Requirement]
    megatron_lm_flags: list[str]
    bridge_overrides: dict[str, Any]
    bridge_perf_harness: str | None
    num_sms: NumSms | None = None
    env: dict[str, str] = {}
    import_error: str | None = None
    constraints: list[str] = []
    when_to_use: list[str]
    notes: str | None = None
    source: Source
    date: Date
    ref: str | None = None

    @model_validator(mode="after")
    def _flex_consistent(self) -> "Backend":
        if (self.dispatcher_type == "flex") != (self.flex_backend is not None):
            raise ValueError("flex_backend must be set exactly when dispatcher_type is 'flex'")
        if self.flex_backend is not None and self.flex_backend != self.id:
            raise ValueError(f"flex backend {self.flex_backend!r} must equal the backend id {self.id!r}")
        if self.megatron_lm_flags[:2] != ["--moe-token-dispatcher-type", self.dispatcher_type]:
            raise ValueError("megatron_lm_flags must start with --moe-token-dispatcher-type <dispatcher_type>")
        return self


class PermuteFusionReq(_Strict):
    distribution: str
    min_version: str


class PermuteFusion(_Strict):
    flag: str
    bridge_key: str
    requires: PermuteFusionReq
    error_without: str
    note: str
    source: Source
    date: Date


class Hardware(_Strict):
    id: str
    arch: str
    nvl72: bool
    nvlink_domain: int | None
    gpus_per_node: int | None
    gpu_names: list[str]
    source: Source
    date: Date
    note: str | None = None


class EpClasses(_Strict):
    small_max: int
    large_min: int
    definitions: dict[Literal["none", "small", "medium", "large"], str]
    source: Source
    date: Date


class ModelFamily(_Strict):
    id: str
    label: str
    aliases: list[str]
    seed_row: str | None


class Stage(_Strict):
    id: Literal["bring-up", "performance"]
    label: str


class Earlier(_Strict):
    """What an older source said for the same table row (kept; the later row decides)."""
    text: str
    why: str | None = None
    notes: str | None = None
    source: Source
    date: Date


class Candidate(_Strict):
    backend: BackendId
    reason: str


class _Dated(_Strict):
    source: Source
    date: Date
    ref: str | None = None
    history: list[Earlier] = []

    @model_validator(mode="after")
    def _history_is_older(self):
        for h in self.history:
            if h.date > self.date:
                raise ValueError(f"history row dated {h.date} is newer than the current row ({self.date})")
        return self


class HardwareRow(_Dated):
    row: str
    hardware: list[str] = Field(min_length=1)
    bring_up: BackendId
    tuned: list[Candidate]                 # the candidate set, in the order to try
    text: str
    why: str


class EpRow(_Dated):
    row: str
    text: str


class ModelRow(_Dated):
    row: str
    text: str
    notes: str


class InterconnectRow(_Dated):
    row: str
    text: str


class Tables(_Strict):
    by_hardware: list[HardwareRow]
    by_ep: list[EpRow]
    by_model: list[ModelRow]
    by_interconnect: list[InterconnectRow] = []


class When(_Strict):
    stage: Literal["bring-up", "performance"] | None = None
    hardware: list[str] | None = None
    nvl72: bool | None = None
    model: list[str] | None = None
    ep_class: list[Literal["none", "small", "medium", "large"]] | None = None
    ep_max: int | None = None
    precision: list[Literal["bf16", "fp8"]] | None = None
    memory_tight: bool | None = None
    interconnect: list[Interconnect] | None = None   # the query must name one of these
    micro_batch_max: int | None = None               # the query must name a micro-batch <= this
    micro_batch_min: int | None = None               # ... or >= this
    nodes_min: int | None = None                     # the query spans at least this many nodes


class Rule(_Strict):
    id: str
    when: When
    choose: BackendId                      # the lead candidate, not a winner
    also_measure: list[BackendId] = []
    why: str
    cites: list[str]
    source: Source
    date: Date
    superseded_by: str | None = None       # a newer rule id: this one is history, not applied
    ref: str | None = None


class Pitfall(_Strict):
    id: str
    text: str
    source: Source
    date: Date
    ref: str | None = None
    verified: bool = True                  # False: a figure from the summary not found in the stored source
    verify_note: str | None = None
    when: "When | None" = None             # recommend warns with it when the query matches ...
    backend: BackendId | None = None       # ... and this backend is among the candidates


class Interaction(_Strict):
    feature: str
    text: str
    source: Source
    date: Date
    history: list[Earlier] = []


class Limitation(_Strict):
    text: str
    source: Source
    date: Date
    ref: str | None = None


class Measured(_Strict):
    id: str
    role: Literal["winner", "recipe", "smoke"]
    model: str                             # model family id
    model_label: str
    hardware: str
    gpus: int = Field(ge=1)
    tp: int = 1
    cp: int = 1
    ep: int = Field(ge=1)
    pp: int = 1
    vpp: int | None = None
    backend: BackendId
    precision: Literal["bf16", "fp8"]
    precision_detail: str
    tflops_per_gpu: float | None = None
    tflops_approx: bool = False
    step_time_s: float | None = None
    mfu: str | None = None
    num_sms: int | None = None
    ep_overlap: bool = False
    micro_batch: int | None = None         # set where the evidence depends on it (the AWS A/Bs)
    interconnect: Interconnect | None = None
    versus: dict[str, float] = {}          # the same cell's step time (s) with other backends
    note: str | None = None
    source: Source
    date: Date
    ref: str | None = None

    @property
    def parallelism(self) -> str:
        return " ".join([f"TP{self.tp}", f"CP{self.cp}", f"EP{self.ep}", f"PP{self.pp}"]
                        + ([f"VPP{self.vpp}"] if self.vpp else []))


class IsolatedEffect(_Strict):
    id: str
    model: str
    hardware: str
    gpus: int
    effect: str
    tflops_before: float
    tflops_after: float
    note: str
    source: Source
    date: Date


class Tuning(_Strict):
    name: str
    backend: BackendId | None = None
    kind: Literal["sms", "env", "flag"] = "sms"
    default: str | None = None             # SM defaults are in backends[].num_sms, not here
    recommended: str
    rationale: str
    megatron_note: str | None = None
    source: Source
    date: Date


class MaxConnWhen(_Strict):
    ep_overlap: bool | None = None
    cuda_graphs: bool | None = None
    model_parallel: bool | None = None     # TP > 1 or CP > 1
    arch: list[str] | None = None


class MaxConnRow(_Strict):
    id: str
    when: MaxConnWhen
    value: str
    why: str
    source: Source
    date: Date
    ref: str | None = None


class AbPlan(_Strict):
    iters: int = Field(ge=1)
    warmup: int = Field(ge=0)
    repeat: int = Field(ge=1)
    benchmark_args: list[str]
    held_fixed: list[str]
    disclosure: str
    source: Source
    date: Date


class Evidence(_Strict):
    model_config = ConfigDict(extra="allow", frozen=True)
    id: str
    source: Source
    date: Date
    what: str
    model: str
    ref: str | None = None
    verified: bool = True


class NewDispatcher(_Strict):
    """A dispatcher that Megatron-Core 0.19 does not have: its limits and where it lives.
    recommend names it (never picks it) when the query fits its limits."""
    id: str
    label: str
    where: str                             # the Megatron version / branch / PR that has it
    not_in: str                            # e.g. "megatron-core 0.19.2"
    what: str
    limits: list[str]
    fits: When                             # the query must satisfy these to be named
    ep_in_nvlink_domain: bool = False      # the EP group must sit inside one NVLink domain
    with_backend: BackendId | None = None  # named only when this backend is a candidate
    evidence: str | None = None
    source: Source
    date: Date
    ref: str
    verified: bool = True
    verify_note: str | None = None


class CorrectnessCheck(_Strict):
    """What to check before trusting a dispatcher at large EP (recommend prints them at ep >= ep_min)."""
    id: str
    ep_min: int
    check: str
    because: str
    source: Source
    date: Date
    ref: str


class Card(_Strict):
    schema_version: Literal[3]
    name: str
    description: str
    when_to_use: str
    validated_on: Date
    validated_against_bridge: Date
    validated_against: str
    provenance: dict[str, Any]
    backends: list[Backend]
    flex_num_sms_flag: str
    flex_num_sms_bridge_key: str
    flex_num_sms_deprecated_flags: list[str]
    permute_fusion: PermuteFusion
    fallback: dict[BackendId, BackendId | None]
    cuda_device_max_connections: list[MaxConnRow]
    hardware: list[Hardware]
    ep_classes: EpClasses
    model_families: list[ModelFamily]
    stages: list[Stage]
    precisions: list[Literal["bf16", "fp8"]]
    tables: Tables
    rules: list[Rule] = Field(min_length=1)
    measured: list[Measured]
    isolated_effects: list[IsolatedEffect]
    tuning: list[Tuning]
    ab_plan: AbPlan
    pitfalls: list[Pitfall]
    interactions: list[Interaction]
    known_limitations: list[Limitation]
    evidence: list[Evidence]
    new_dispatchers: list[NewDispatcher] = []
    correctness_checks: list[CorrectnessCheck] = []
    interconnects: list[Interconnect] = list(INTERCONNECTS)

    @model_validator(mode="after")
    def _cross_refs(self) -> "Card":
        ids = [b.id for b in self.backends]
        if sorted(ids) != sorted(BACKEND_IDS):
            raise ValueError(f"backends must be exactly {list(BACKEND_IDS)}, got {ids}")
        if set(self.fallback) != set(BACKEND_IDS):
            raise ValueError(f"fallback must name every backend {list(BACKEND_IDS)}")
        for b, fb in self.fallback.items():
            if fb is not None and self.fallback.get(fb) is not None:
                raise ValueError(f"fallback of {b!r} ({fb!r}) must itself need no fallback")
        hw_ids = {h.id for h in self.hardware}
        fam_ids = {m.id for m in self.model_families}
        if "unknown" not in hw_ids:
            raise ValueError("hardware must include 'unknown'")
        row_names = {f"by_hardware:{r.row}" for r in self.tables.by_hardware}
        row_names |= {f"by_ep:{r.row}" for r in self.tables.by_ep}
        row_names |= {f"by_model:{r.row}" for r in self.tables.by_model}
        row_names |= {f"by_interconnect:{r.row}" for r in self.tables.by_interconnect}
        covered = [h for r in self.tables.by_hardware for h in r.hardware]
        for h in covered:
            if h not in hw_ids:
                raise ValueError(f"tables.by_hardware names unknown hardware {h!r}; allowed: {sorted(hw_ids)}")
        if sorted(covered) != sorted(hw_ids):
            raise ValueError(f"tables.by_hardware must name every hardware id exactly once: {sorted(hw_ids)}, got {sorted(covered)}")
        for m in self.measured:
            if m.hardware not in hw_ids or m.model not in fam_ids:
                raise ValueError(f"measured row {m.id!r}: unknown hardware {m.hardware!r} or model family {m.model!r}")
            if m.role == "winner" and m.tflops_per_gpu is None:
                raise ValueError(f"measured row {m.id!r}: a winner needs tflops_per_gpu")
        by_id = {r.id: r for r in self.rules}
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                raise ValueError(f"duplicate rule id {rule.id!r}")
            seen.add(rule.id)
            if rule.superseded_by is not None:
                newer = by_id.get(rule.superseded_by)
                if newer is None or newer.superseded_by is not None:
                    raise ValueError(f"rule {rule.id!r} is superseded by {rule.superseded_by!r}, which is not a current rule")
                if newer.date <= rule.date:
                    raise ValueError(f"rule {rule.id!r} ({rule.date}) is superseded by an older or same-dated rule {newer.id!r} ({newer.date}): the later evidence decides")
            for h in rule.when.hardware or []:
                if h not in hw_ids:
                    raise ValueError(f"rule {rule.id!r}: unknown hardware {h!r}; allowed: {sorted(hw_ids)}")
            for m in rule.when.model or []:
                if m not in fam_ids:
                    raise ValueError(f"rule {rule.id!r}: unknown model family {m!r}; allowed: {sorted(fam_ids)}")
            for c in rule.cites:
                if c not in row_names:
                    raise ValueError(f"rule {rule.id!r} cites {c!r}, which is not a table row; rows: {sorted(row_names)}")
        for fam in self.model_families:
            if fam.seed_row is not None and f"by_model:{fam.seed_row}" not in row_names:
                raise ValueError(f"model family {fam.id!r} names seed row {fam.seed_row!r}, not in tables.by_model")
        aliases: dict[str, str] = {}
        for fam in self.model_families:
            for a in [fam.id, *fam.aliases]:
                key = normalize_name(a)
                if aliases.get(key, fam.id) != fam.id:
                    raise ValueError(f"alias {a!r} names two model families")
                aliases[key] = fam.id
        return self

    # -- lookups -------------------------------------------------------------
    def backend(self, backend_id: str) -> Backend:
        for b in self.backends:
            if b.id == backend_id:
                return b
        raise KeyError(backend_id)

    def hardware_entry(self, hw_id: str) -> Hardware:
        for h in self.hardware:
            if h.id == hw_id:
                return h
        raise KeyError(hw_id)

    @property
    def hardware_ids(self) -> list[str]:
        return [h.id for h in self.hardware]

    def resolve_hardware(self, name: str) -> str:
        """Map a user string ('h100', 'NVIDIA H100 80GB HBM3', 'GB200 NVL72') to a card id."""
        key = normalize_name(name)
        for h in self.hardware:
            if key == normalize_name(h.id):
                return h.id
        # GPU product names ("NVIDIA H100 80GB HBM3", "NVIDIA GB200"): whole-token match,
        # so that GB200 is not read as B200 and GH200 is not read as H200.
        for h in self.hardware:
            for g in h.gpu_names:
                if re.search(rf"(?<![A-Za-z0-9]){re.escape(g)}(?![A-Za-z0-9])", name, re.I):
                    return h.id
        for h in self.hardware:  # 'gb200nvl72', 'GB200 NVL72'
            if key.startswith(normalize_name(h.id)) and h.id != "unknown":
                return h.id
        raise UsageError(f"unknown hardware {name!r}; allowed: auto, {', '.join(self.hardware_ids)}")

    def resolve_model(self, name: str) -> str:
        key = normalize_name(name)
        for fam in self.model_families:
            if key in {normalize_name(a) for a in [fam.id, *fam.aliases]}:
                return fam.id
        allowed = sorted({a for fam in self.model_families for a in [fam.id, *fam.aliases]})
        raise UsageError(f"unknown model {name!r}; allowed: {', '.join(allowed)}")

    def family(self, fam_id: str) -> ModelFamily:
        for fam in self.model_families:
            if fam.id == fam_id:
                return fam
        raise KeyError(fam_id)

    @property
    def current_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.superseded_by is None]

    def hardware_row(self, hw_id: str) -> HardwareRow:
        for r in self.tables.by_hardware:
            if hw_id in r.hardware:
                return r
        raise KeyError(hw_id)

    def table_row(self, ref: str) -> HardwareRow | EpRow | ModelRow | InterconnectRow:
        table, _, row = ref.partition(":")
        for r in getattr(self.tables, table):
            if r.row == row:
                return r
        raise KeyError(ref)


def normalize_name(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", s.lower())


def format_validation_error(exc: ValidationError, what: str, models: dict[tuple, type[BaseModel]] | None = None) -> str:
    """One line: the first problem (a misspelled field first: it explains the others) with its dotted
    field path, the message and the allowed values when known, then the other fields named."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and models is not None:
            parent = tuple(p for p in err["loc"][:-1] if not isinstance(p, int))
            model = models.get(parent)
            if model is not None:
                msg += f"; allowed fields here: {', '.join(model.model_fields)}"
        got = err.get("input")
        if err["type"] not in ("missing",) and not isinstance(got, (dict, list)):
            msg += f" (got {got!r})"
        parts.append((loc, msg))
    first_loc, first_msg = parts[0]
    rest = f"; {len(parts) - 1} more: " + ", ".join(f"'{loc}'" for loc, _ in parts[1:6]) + \
        (" ..." if len(parts) > 6 else "") if len(parts) > 1 else ""
    return f"{what}: field '{first_loc}': {first_msg}{rest}"


def load_card(path: Path | str | None = None) -> Card:
    p = Path(path) if path is not None else CARD_PATH
    if not p.is_file():
        raise UsageError(f"skill card not found at {p} (package data missing from this install: megatron_moe_probe/resources/card.yaml)")
    data = read_yaml(p, "skill card")
    try:
        return Card.model_validate(data)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, f"skill card {p}")) from exc


@lru_cache(maxsize=1)
def default_card() -> Card:
    return load_card(CARD_PATH)


# -- SKILL.md tables ----------------------------------------------------------

def _label(card: Card, backend_id: str) -> str:
    b = card.backend(backend_id)
    return f"`{b.id}`" if b.dispatcher_type != "flex" else b.label


def _src(source: str, date: str, ref: str | None = None) -> str:
    return f"{source}, {date}" + (f", {ref}" if ref and source == "public" else "")


def _earlier(history: list[Earlier]) -> str:
    return "; ".join(f"{h.text} ({_src(h.source, h.date)})" for h in history) or "-"


def skill_tables(card: Card) -> dict[str, str]:
    """Markdown for each generated SKILL.md section, keyed by marker name."""
    out: dict[str, str] = {}
    rows = ["| Hardware | Bring-up path | Tuned candidates | Why | Source | Earlier |", "|---|---|---|---|---|---|"]
    for r in card.tables.by_hardware:
        tuned = ", ".join(_label(card, c.backend) for c in r.tuned)
        rows.append(f"| {r.row} | {_label(card, r.bring_up)} | {tuned}: {r.text} | {r.why} | {_src(r.source, r.date, r.ref)} | {_earlier(r.history)} |")
    out["by_hardware"] = "\n".join(rows)
    rows = ["| EP size | Guidance | Source | Earlier |", "|---|---|---|---|"]
    rows += [f"| {r.row} | {r.text} | {_src(r.source, r.date)} | {_earlier(r.history)} |" for r in card.tables.by_ep]
    defs = card.ep_classes.definitions
    rows += ["", "EP classes as this card computes them: " + "; ".join(f"**{k}**: {v}" for k, v in defs.items()) + "."]
    out["by_ep"] = "\n".join(rows)
    rows = ["| Workload | Common best path | Notes | Source | Earlier |", "|---|---|---|---|---|"]
    rows += [f"| {r.row} | {r.text} | {r.notes} | {_src(r.source, r.date, r.ref)} | {_earlier(r.history)} |" for r in card.tables.by_model]
    out["by_model"] = "\n".join(rows)
    rows = ["| Interconnect / micro-batch | Guidance | Source | Earlier |", "|---|---|---|---|"]
    rows += [f"| {r.row} | {r.text} | {_src(r.source, r.date, r.ref)} | {_earlier(r.history)} |" for r in card.tables.by_interconnect]
    out["by_interconnect"] = "\n".join(rows)
    rows = ["| Dispatcher | Where (not in Megatron-Core 0.19) | What | Limits | Source |", "|---|---|---|---|---|"]
    for d in card.new_dispatchers:
        lim = "; ".join(d.limits) + ("" if d.verified else f" (unverified: {d.verify_note})")
        rows.append(f"| {d.label} | {d.where} | {d.what} | {lim} | {_src(d.source, d.date, d.ref)} |")
    out["new_dispatchers"] = "\n".join(rows)
    rows = ["| From EP | Check | Because | Source |", "|---|---|---|---|"]
    rows += [f"| {c.ep_min} | {c.check} | {c.because} | {_src(c.source, c.date, c.ref)} |" for c in card.correctness_checks]
    out["correctness"] = "\n".join(rows)
    rows = ["| Model | Hardware | Dispatcher | Precision | TFLOP/s/GPU | Step time | Parallelism | Role | Source | Note |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for m in card.measured:
        tf = "-" if m.tflops_per_gpu is None else ("~" if m.tflops_approx else "") + f"{m.tflops_per_gpu:g}"
        st = "-" if m.step_time_s is None else f"{m.step_time_s:g} s"
        shape = m.parallelism + (f" mb{m.micro_batch}" if m.micro_batch else "") + (f" {m.interconnect}" if m.interconnect else "")
        vs = "; ".join(f"{_label(card, b)} {t:g} s" for b, t in m.versus.items())
        note = m.note or (m.mfu and 'MFU ' + m.mfu) or '-'
        rows.append(f"| {m.model_label} | {m.gpus}×{m.hardware} | {_label(card, m.backend)} | {m.precision_detail} | {tf} | {st} "
                    f"| {shape} | {m.role} | {_src(m.source, m.date, m.ref)} | {note + (' (vs ' + vs + ')' if vs else '')} |")
    out["measured"] = "\n".join(rows)
    rows = ["| Parameter | Default | Recommended | Why | Source |", "|---|---|---|---|---|"]
    for tp in card.tuning:
        default = tp.default
        if default is None and tp.backend is not None and card.backend(tp.backend).num_sms is not None:
            default = str(card.backend(tp.backend).num_sms.default)
        rows.append(f"| `{tp.name}` | {default or '-'} | {tp.recommended} | {tp.rationale} | {_src(tp.source, tp.date)} |")
    for mc in card.cuda_device_max_connections:
        cond = ", ".join(f"{k}={_fmt(v)}" for k, v in mc.when.model_dump(exclude_none=True).items())
        rows.append(f"| `CUDA_DEVICE_MAX_CONNECTIONS={mc.value}` | - | when {cond} | {mc.why} | {_src(mc.source, mc.date)} |")
    out["tuning"] = "\n".join(rows)
    rows = ["| # | Rule | When | Lead candidate | Also measure | Source | Status |", "|---|---|---|---|---|---|---|"]
    for i, rule in enumerate(card.rules, 1):
        cond = ", ".join(f"{k}={_fmt(v)}" for k, v in rule.when.model_dump(exclude_none=True).items())
        also = ", ".join(_label(card, b) for b in rule.also_measure) or "-"
        status = f"superseded by `{rule.superseded_by}`" if rule.superseded_by else "current"
        rows.append(f"| {i} | `{rule.id}` | {cond} | {_label(card, rule.choose)} | {also} | {_src(rule.source, rule.date, rule.ref)} | {status} |")
    out["rules"] = "\n".join(rows)
    rows = ["| Backend | Megatron-LM flags | Megatron-Bridge overrides | Needs (import) | Fallback |", "|---|---|---|---|---|"]
    for b in card.backends:
        flags = " ".join(b.megatron_lm_flags)
        bridge = " ".join(f"{k}={_fmt(v)}" for k, v in b.bridge_overrides.items())
        needs = "; ".join(
            f"`from {r.module.rsplit('.', 1)[0]} import {r.module.rsplit('.', 1)[1]}`" if not r.attrs and "." in r.module
            else f"`from {r.module} import {', '.join(r.attrs)}`" if r.attrs else f"`import {r.module}`"
            for r in b.requires
        ) or "-"
        fb = card.fallback[b.id]
        rows.append(f"| {_label(card, b.id)} | `{flags}` | `{bridge}` | {needs} | {_label(card, fb) if fb else '-'} |")
    out["backends"] = "\n".join(rows)
    out["pitfalls"] = "\n".join(f"{i}. {p.text} ({_src(p.source, p.date, p.ref)})"
                                 + ("" if p.verified else f" [unverified: {p.verify_note}]")
                                 for i, p in enumerate(card.pitfalls, 1))
    out["limitations"] = "\n".join(f"- {lim.text} ({_src(lim.source, lim.date, lim.ref)})" for lim in card.known_limitations)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "/".join(str(x) for x in v)
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


MARKER_RE = re.compile(r"(<!-- card:(\w+) -->\n)(.*?)\n?(<!-- /card:\2 -->)", re.S)


DOCS_PATH = REPO_ROOT / "docs" / "dispatchers.md"


def write_skill_tables(card: Card, path: Path = SKILL_MD_PATH, require_all: bool = True) -> bool:
    """Rewrite the generated sections of SKILL.md (or docs/dispatchers.md); True when the file changed."""
    text = path.read_text()
    tables = skill_tables(card)
    found: set[str] = set()

    def sub(m: re.Match) -> str:
        found.add(m.group(2))
        if m.group(2) not in tables:
            raise UsageError(f"{path}: unknown card section marker {m.group(2)!r}; known: {sorted(tables)}")
        return m.group(1) + tables[m.group(2)] + "\n" + m.group(4)

    new = MARKER_RE.sub(sub, text)
    missing = set(tables) - found
    if require_all and missing:
        raise UsageError(f"{path}: missing card section markers: {sorted(missing)}")
    if new != text:
        atomic_write_text(path, new)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="validate the skill card; optionally regenerate SKILL.md tables")
    ap.add_argument("--card", default=str(CARD_PATH))
    ap.add_argument("--write-skill", action="store_true", help="rewrite the generated tables in SKILL.md")
    args = ap.parse_args(argv)
    try:
        card = load_card(args.card)
        print(f"card ok: {len(card.rules)} rules, {len(card.backends)} backends")
        if args.write_skill:
            for path, req in ((SKILL_MD_PATH, True), (DOCS_PATH, False)):
                if path.is_file():
                    changed = write_skill_tables(card, path, require_all=req)
                    print(f"{path.name} updated" if changed else f"{path.name} already up to date")
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
