"""The dispatcher-selection skill card: schema, loading, and SKILL.md table rendering.

The card (`skills/perf-moe-dispatcher-selection/card.yaml`) is data; this module only
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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record import atomic_write_text
from megatron_moe_probe.yaml_io import package_data, read_yaml

BackendId = Literal["alltoall", "allgather", "deepep", "hybridep", "ncclep"]
BACKEND_IDS: tuple[str, ...] = ("alltoall", "allgather", "deepep", "hybridep", "ncclep")
Source = Literal["seed", "seed-upstream", "megatron", "project"]

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


class Hardware(_Strict):
    id: str
    arch: str
    nvl72: bool
    nvlink_domain: int | None
    gpus_per_node: int | None
    gpu_names: list[str]
    source: Source
    note: str | None = None


class EpClasses(_Strict):
    small_max: int
    large_min: int
    definitions: dict[Literal["none", "small", "medium", "large"], str]


class ModelFamily(_Strict):
    id: str
    label: str
    aliases: list[str]
    seed_row: str | None


class Stage(_Strict):
    id: Literal["bring-up", "performance"]
    label: str


class HardwareRow(_Strict):
    row: str
    first_choice: BackendId
    text: str
    why: str
    source: Source


class EpRow(_Strict):
    row: str
    first_choice: BackendId
    also: list[BackendId] = []
    text: str
    source: Source


class ModelRow(_Strict):
    row: str
    text: str
    notes: str
    source: Source


class Tables(_Strict):
    by_hardware: list[HardwareRow]
    by_ep: list[EpRow]
    by_model: list[ModelRow]


class When(_Strict):
    stage: Literal["bring-up", "performance"] | None = None
    hardware: list[str] | None = None
    nvl72: bool | None = None
    model: list[str] | None = None
    ep_class: list[Literal["none", "small", "medium", "large"]] | None = None
    ep_max: int | None = None
    precision: list[Literal["bf16", "fp8"]] | None = None
    memory_tight: bool | None = None


class Rule(_Strict):
    id: str
    when: When
    choose: BackendId
    also_measure: list[BackendId] = []
    why: str
    cites: list[str]
    source: Source


class Pitfall(_Strict):
    id: str
    text: str
    source: Source


class Interaction(_Strict):
    feature: str
    text: str
    source: Source


class Evidence(_Strict):
    model_config = ConfigDict(extra="allow", frozen=True)
    id: str
    source: Source
    what: str
    model: str


class Card(_Strict):
    schema_version: Literal[1]
    name: str
    description: str
    when_to_use: str
    validated_on: str
    validated_against: str
    provenance: dict[str, Any]
    backends: list[Backend]
    flex_num_sms_flag: str
    flex_num_sms_bridge_key: str
    flex_num_sms_deprecated_flags: list[str]
    permute_fusion: PermuteFusion
    fallback: dict[BackendId, BackendId | None]
    hardware: list[Hardware]
    ep_classes: EpClasses
    model_families: list[ModelFamily]
    stages: list[Stage]
    precisions: list[Literal["bf16", "fp8"]]
    tables: Tables
    rules: list[Rule] = Field(min_length=1)
    pitfalls: list[Pitfall]
    interactions: list[Interaction]
    evidence: list[Evidence]

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
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                raise ValueError(f"duplicate rule id {rule.id!r}")
            seen.add(rule.id)
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

    def table_row(self, ref: str) -> HardwareRow | EpRow | ModelRow:
        table, _, row = ref.partition(":")
        for r in getattr(self.tables, table):
            if r.row == row:
                return r
        raise KeyError(ref)


def normalize_name(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", s.lower())


def format_validation_error(exc: ValidationError, what: str, models: dict[tuple, type[BaseModel]] | None = None) -> str:
    """One line per error: the dotted field path, the message, the allowed values when known."""
    lines = [f"{what}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
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
        lines.append(f"  field '{loc}': {msg}")
    return "\n".join(lines)


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


def skill_tables(card: Card) -> dict[str, str]:
    """Markdown for each generated SKILL.md section, keyed by marker name."""
    out: dict[str, str] = {}
    rows = ["| Hardware | First choice | Why |", "|---|---|---|"]
    rows += [f"| {r.row} | {r.text} | {r.why} |" for r in card.tables.by_hardware]
    out["by_hardware"] = "\n".join(rows)
    rows = ["| EP size | Guidance |", "|---|---|"]
    rows += [f"| {r.row} | {r.text} |" for r in card.tables.by_ep]
    defs = card.ep_classes.definitions
    rows += ["", "EP classes as this card computes them: " + "; ".join(f"**{k}**: {v}" for k, v in defs.items()) + "."]
    out["by_ep"] = "\n".join(rows)
    rows = ["| Workload | Common best path | Notes |", "|---|---|---|"]
    rows += [f"| {r.row} | {r.text} | {r.notes} |" for r in card.tables.by_model]
    out["by_model"] = "\n".join(rows)
    rows = ["| # | Rule | When | Choose | Also measure |", "|---|---|---|---|---|"]
    for i, rule in enumerate(card.rules, 1):
        cond = ", ".join(f"{k}={_fmt(v)}" for k, v in rule.when.model_dump(exclude_none=True).items())
        also = ", ".join(_label(card, b) for b in rule.also_measure) or "-"
        rows.append(f"| {i} | `{rule.id}` | {cond} | {_label(card, rule.choose)} | {also} |")
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
    out["pitfalls"] = "\n".join(f"{i}. {p.text}" for i, p in enumerate(card.pitfalls, 1))
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
