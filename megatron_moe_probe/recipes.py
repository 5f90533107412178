"""Recipes: `recipes/*.yaml` -> Megatron-LM arguments and Megatron-Bridge overrides.

A recipe names a model shape (with the source of every number), parallelism, a
dispatcher (`auto` resolves through the skill card and the availability gate), probe
settings and data. The schema is pydantic v2 with `extra="forbid"`: an error names the
dotted field and, for enumerations, the allowed values.

    render(recipe, availability=...)        Megatron-LM args for model/parallelism/dispatcher/data/training
    probe_args(recipe)                      the probe's own flags (not known to Megatron's parser)
    render(recipe, include_probe=True)      both
    bridge_overrides(recipe, availability)  Megatron-Bridge `key=value` overrides

`moe-probe render NAME[:VARIANT]` prints them (commands/render.py). The recipe files are
package data (megatron_moe_probe/resources/recipes/), so a wheel install has them.
"""

from __future__ import annotations

import copy
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.yaml_io import read_yaml
from megatron_moe_probe.selection.availability import Availability, assumed, parse_backend_list, detect_backends
from megatron_moe_probe.selection.card import Card, default_card, format_validation_error
from megatron_moe_probe.selection.recommend import Query, Recommendation, recommend
from megatron_moe_probe.settings import probe_flags
from megatron_moe_probe.writers.base import WRITER_NAMES
from megatron_moe_probe.yaml_io import package_data

RECIPES_DIR = package_data("recipes")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _card(info: ValidationInfo) -> Card:
    """The skill card a recipe is validated against, handed in by `load_recipe_data` (validation
    context), so that checking a field reads nothing from disk."""
    card = (info.context or {}).get("card")
    if card is None:
        raise ValueError("validate recipes with load_recipe_data (it supplies the skill card)")
    return card


class Moe(_Strict):
    num_experts: int = Field(ge=1)
    router_topk: int = Field(ge=1)
    ffn_hidden_size: int = Field(ge=1)
    layer_freq: int | str = 1                      # int, or Megatron's "([0]*3+[1]*58)" pattern
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    router_pre_softmax: bool = False
    router_topk_scaling_factor: float | None = None
    router_num_groups: int | None = None
    router_group_topk: int | None = None
    router_enable_expert_bias: bool = False
    router_dtype: Literal["fp32", "fp64"] | None = None
    load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    aux_loss_coeff: float = 0.0
    grouped_gemm: bool = False

    @model_validator(mode="after")
    def _topk(self) -> "Moe":
        if self.router_topk > self.num_experts:
            raise ValueError(f"router_topk ({self.router_topk}) exceeds num_experts ({self.num_experts})")
        return self


class Mla(_Strict):
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int


class Yarn(_Strict):
    scaling_factor: float
    original_max_position_embeddings: int
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    beta_fast: float | None = None
    beta_slow: float | None = None


class LinearAttention(_Strict):
    variant: Literal["gated_delta_net"]
    freq: int = Field(ge=1)                       # one full-attention layer every `freq` layers
    key_head_dim: int
    value_head_dim: int
    num_key_heads: int
    num_value_heads: int
    conv_kernel_dim: int = 4


class Model(_Strict):
    family: str
    hf_id: str | None = None
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    ffn_hidden_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_query_groups: int | None = None
    kv_channels: int | None = None
    vocab_size: int = Field(ge=1)
    max_position_embeddings: int = Field(ge=1)
    position_embedding: Literal["rope", "learned_absolute", "none"] = "rope"
    rope_type: Literal["rope", "yarn"] | None = None
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    yarn: Yarn | None = None
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    qk_layernorm: bool = False
    swiglu: bool = True
    untie_embeddings: bool = True
    add_bias_linear: bool = False
    attention_output_gate: bool = False
    mla: Mla | None = None
    linear_attention: LinearAttention | None = None
    mtp_num_layers: int | None = None
    moe: Moe
    extra_args: list[str] = []

    @field_validator("family")
    @classmethod
    def _family(cls, v: str, info: ValidationInfo) -> str:
        fams = [f.id for f in _card(info).model_families]
        if v not in fams:
            raise ValueError(f"unknown model family {v!r}; allowed: {', '.join(fams)}")
        return v


class Parallelism(_Strict):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    cp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    etp: int = Field(1, ge=1)
    sequence_parallel: bool = False
    layers_per_virtual_stage: int | None = None
    pipeline_layout: str | None = None
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class Training(_Strict):
    micro_batch_size: int = Field(ge=1)
    global_batch_size: int = Field(ge=1)
    seq_length: int = Field(ge=1)
    train_iters: int = Field(ge=1)
    lr: float = 1e-4
    min_lr: float | None = None
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    log_interval: int = Field(10, ge=1)
    eval_iters: int = 0
    eval_interval: int = 1000
    # "auto": transformer_engine where it is installed (>= the version permute fusion needs), else
    # local, with a note saying why; `te_extra_args` are rendered only with transformer_engine.
    transformer_impl: Literal["transformer_engine", "local", "auto"] = "transformer_engine"
    te_extra_args: list[str] = []
    extra_args: list[str] = []


class Dispatcher(_Strict):
    type: Literal["auto", "alltoall", "allgather", "flex"] = "auto"
    backend: Literal["deepep", "hybridep", "ncclep"] | None = None
    hardware: str = "unknown"
    stage: Literal["bring-up", "performance"] = "performance"
    precision: Literal["bf16", "fp8"] = "bf16"     # what the card's Qwen3-Next rows look at
    memory_tight: bool = False
    permute_fusion: Literal["auto", "on", "off"] = "auto"
    num_sms: int | None = Field(None, ge=1)

    @field_validator("hardware")
    @classmethod
    def _hw(cls, v: str, info: ValidationInfo) -> str:
        card = _card(info)
        try:
            return card.resolve_hardware(v)
        except UsageError:
            raise ValueError(f"unknown hardware {v!r}; allowed: {', '.join(card.hardware_ids)}") from None

    @model_validator(mode="after")
    def _backend(self) -> "Dispatcher":
        if self.type == "flex" and self.backend is None:
            raise ValueError("type 'flex' needs backend: one of 'deepep', 'hybridep', 'ncclep'")
        if self.type != "flex" and self.backend is not None:
            raise ValueError(f"backend {self.backend!r} only applies to type 'flex' (type is {self.type!r})")
        return self

    @property
    def forced(self) -> str | None:
        if self.type == "auto":
            return None
        return self.backend if self.type == "flex" else self.type


Writer = Literal[WRITER_NAMES]


class ProbeSection(_Strict):
    """The recipe's `probe:` section: the probe flags this recipe's runs get."""

    enabled: bool = True
    interval: int | None = Field(None, ge=1)       # default: training.log_interval
    dir: str | None = None                         # default: runs/moe-probe/<recipe>
    writers: list[Writer] = ["local"]
    timing: bool | Literal["forward", "all"] = False  # true / "forward": forward calls; "all": and backward
    gpus_per_node: int | None = Field(None, ge=1)  # default: parallelism.gpus_per_node


class Tokenizer(_Strict):
    type: Literal["NullTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "SentencePieceTokenizer"] = "NullTokenizer"
    model: str | None = None


class Data(_Strict):
    source: Literal["mock", "path"] = "mock"
    paths: list[str] = []
    split: str | None = None
    tokenizer: Tokenizer = Tokenizer()

    @model_validator(mode="after")
    def _paths(self) -> "Data":
        if self.source == "path" and not self.paths:
            raise ValueError("source 'path' needs paths: [prefix, ...] (Megatron --data-path)")
        if self.source == "mock" and self.paths:
            raise ValueError("source 'mock' takes no paths (use source: path)")
        if self.tokenizer.type != "NullTokenizer" and not self.tokenizer.model:
            raise ValueError(f"tokenizer type {self.tokenizer.type!r} needs tokenizer.model")
        return self


class Bridge(_Strict):
    recipe: str | None = None          # the Megatron-Bridge recipe the shape/parallelism follow
    source: str | None = None


class Recipe(_Strict):
    name: str
    description: str
    sources: dict[str, str] = {}       # field -> where the number comes from
    model: Model
    parallelism: Parallelism
    training: Training
    dispatcher: Dispatcher = Dispatcher()
    probe: ProbeSection = ProbeSection()
    data: Data = Data()
    bridge: Bridge = Bridge()
    variants: dict[str, dict[str, Any]] = {}
    variant: str | None = None         # set by the loader, not in files

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        p, m, t = self.parallelism, self.model, self.training
        world = p.world_size
        if p.ep > world:
            raise ValueError(f"parallelism.ep={p.ep} is larger than the world ({p.nodes} node(s) x {p.gpus_per_node} GPUs = {world})")
        if m.moe.num_experts % p.ep:
            ok = [d for d in range(1, m.moe.num_experts + 1) if m.moe.num_experts % d == 0 and d <= world]
            raise ValueError(
                f"parallelism.ep={p.ep} does not divide model.moe.num_experts={m.moe.num_experts}; allowed EP: {', '.join(map(str, ok))}"
            )
        dense = p.tp * p.pp * p.cp
        if world % dense:
            raise ValueError(f"world size {world} is not divisible by tp*pp*cp = {dense}")
        expert = p.etp * p.ep * p.pp
        if world % expert:
            raise ValueError(f"world size {world} is not divisible by etp*ep*pp = {expert}")
        dp = world // dense
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(
                f"training.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x data-parallel "
                f"({t.micro_batch_size} x {dp})"
            )
        if m.num_attention_heads % p.tp:
            raise ValueError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallelism.tp={p.tp}")
        if t.seq_length > m.max_position_embeddings and m.position_embedding == "learned_absolute":
            raise ValueError("training.seq_length exceeds model.max_position_embeddings")
        if self.variants and self.variant is None:
            for vname in self.variants:
                if ":" in vname or not vname:
                    raise ValueError(f"bad variant name {vname!r}")
        return self

    @property
    def full_name(self) -> str:
        return f"{self.name}:{self.variant}" if self.variant else self.name

    @property
    def data_parallel_size(self) -> int:
        p = self.parallelism
        return p.world_size // (p.tp * p.pp * p.cp)


SCHEMA_MODELS: dict[tuple, type[BaseModel]] = {
    (): Recipe, ("model",): Model, ("model", "moe"): Moe, ("model", "mla"): Mla, ("model", "yarn"): Yarn,
    ("model", "linear_attention"): LinearAttention, ("parallelism",): Parallelism, ("training",): Training,
    ("dispatcher",): Dispatcher, ("probe",): ProbeSection, ("data",): Data, ("data", "tokenizer"): Tokenizer,
    ("bridge",): Bridge,
}


# -- loading ------------------------------------------------------------------------

def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def recipe_paths() -> list[Path]:
    if not RECIPES_DIR.is_dir():
        raise UsageError(f"recipes directory not found at {RECIPES_DIR} (package data missing from this install)")
    return sorted(RECIPES_DIR.glob("*.yaml"))


def recipe_names() -> list[str]:
    try:
        return [p.stem for p in recipe_paths()]
    except UsageError:
        return []


def load_recipe_data(data: Any, what: str, variant: str | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise UsageError(f"{what}: a recipe must be a YAML mapping, got {type(data).__name__}")
    raw = dict(data)
    variants = raw.get("variants") or {}
    if variant is not None:
        if not isinstance(variants, dict) or variant not in variants:
            names = ", ".join(variants) if isinstance(variants, dict) and variants else "(none)"
            raise UsageError(f"{what}: unknown variant {variant!r}; allowed: {names}")
        over = variants[variant]
        if not isinstance(over, dict):
            raise UsageError(f"{what}: variant {variant!r} must be a mapping of overrides")
        raw = _deep_merge(raw, over)
        raw["variant"] = variant
    elif "variant" in raw:
        raise UsageError(f"{what}: field 'variant' is set by NAME:VARIANT, not in the file")
    try:
        return Recipe.model_validate(raw, context={"card": default_card()})
    except ValidationError as exc:
        label = f"{what}" + (f" (variant {variant})" if variant else "")
        raise UsageError(format_validation_error(exc, f"recipe {label}", SCHEMA_MODELS)) from None


def load_recipe(spec: str | Path) -> Recipe:
    """NAME, NAME:VARIANT, or a path to a YAML file (optionally PATH:VARIANT)."""
    s = str(spec)
    variant = None
    base = s
    if ":" in s and not Path(s).exists():
        base, _, variant = s.rpartition(":")
    path = Path(base)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = RECIPES_DIR / f"{base}.yaml"
        if not path.is_file():
            raise UsageError(f"unknown recipe {base!r}; allowed: {', '.join(recipe_names()) or '(no recipes found)'} or a path to a .yaml file")
    data = read_yaml(path, "recipe")
    r = load_recipe_data(data, str(path), variant)
    if path.parent == RECIPES_DIR and r.name != path.stem:
        raise UsageError(f"recipe {path}: field 'name' is {r.name!r} but the file is {path.stem!r}.yaml")
    return r


def find_recipe_quiet(name: str) -> Recipe | None:
    """A recipe whose file name matches `name` (case/punctuation-insensitive), or None."""
    from megatron_moe_probe.selection.card import normalize_name

    key = normalize_name(name)
    for n in recipe_names():
        if normalize_name(n) == key:
            try:
                return load_recipe(n)
            except UsageError:
                return None
    return None


def all_recipe_specs() -> list[str]:
    """Every NAME and NAME:VARIANT in recipes/ (what CI validates)."""
    out = []
    for p in recipe_paths():
        data = read_yaml(p, "recipe") or {}
        out.append(p.stem)
        out.extend(f"{p.stem}:{v}" for v in (data.get("variants") or {}))
    return out


# -- dispatcher resolution -------------------------------------------------------------

@dataclass
class Resolved:
    recommendation: Recommendation
    backend: str                     # what the rendered args use
    megatron_lm: list[str]
    bridge: dict[str, Any]
    env: dict[str, str]
    notes: list[str]
    transformer_impl: str = "transformer_engine"  # what --transformer-impl renders ("auto" resolved)


def _has_flag(args: list[str], *names: str) -> bool:
    return any(a.split("=", 1)[0] in names for a in args)


def dispatcher_request(r: Recipe) -> Query:
    """The recipe as a typed dispatcher request: everything recommend needs for final flags."""
    card = default_card()
    d, p = r.dispatcher, r.parallelism
    hw = card.hardware_entry(d.hardware)
    nvlink = hw.nvlink_domain if hw.nvl72 else min(p.gpus_per_node, hw.nvlink_domain or p.gpus_per_node)
    extra = [*r.training.extra_args, *r.training.te_extra_args, *r.model.extra_args]
    return Query(
        hardware=d.hardware, ep=p.ep, model=r.model.family, stage=d.stage, gpus_per_node=p.gpus_per_node,
        nodes=p.nodes, nvlink_domain=nvlink, precision=d.precision, memory_tight=d.memory_tight,
        num_experts=r.model.moe.num_experts, tp=p.tp, cp=p.cp, force=d.forced,
        permute_fusion=d.permute_fusion, num_sms=d.num_sms,
        ep_overlap=_has_flag(extra, "--overlap-moe-expert-parallel-comm"),
        cuda_graphs=_has_flag(extra, "--cuda-graph-impl", "--enable-cuda-graph", "--external-cuda-graph"),
    )


def resolve_dispatcher(r: Recipe, availability: Availability | None = None) -> Resolved:
    """Ask the selection for the recipe's dispatcher; its flags come back final."""
    card = default_card()
    availability = availability or detect_backends(card)
    try:
        rec = recommend(dispatcher_request(r), card, availability)
    except UsageError as exc:
        raise UsageError(f"recipe {r.full_name}: dispatcher: {exc}") from None
    fs = rec.flags[rec.use]
    notes = [f"dispatcher: {rec.use}" + (f" ({rec.decision}, card rule {rec.rule.id})" if rec.rule else
                                         f" ({rec.decision})")]
    notes += rec.warnings
    if r.dispatcher.permute_fusion == "off":
        notes.append("permute fusion off (recipe)")
    impl = r.training.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if availability.permute_fusion else "local"
        why = "transformer-engine found" if availability.permute_fusion else availability.permute_fusion_detail
        dropped = f"; not rendered: {' '.join(r.training.te_extra_args)}" if impl == "local" and r.training.te_extra_args else ""
        notes.append(f"transformer implementation: {impl} (auto: {why}){dropped}")
    return Resolved(rec, rec.use, list(fs.megatron_lm), dict(fs.bridge), dict(fs.env), notes, impl)


def with_dispatcher(r: Recipe, backend: str) -> Recipe:
    """The recipe with its dispatcher forced to one backend id (an A/B cell); all else unchanged."""
    card = default_card()
    try:
        b = card.backend(backend)
    except KeyError:
        raise UsageError(f"unknown dispatcher {backend!r}; allowed: {', '.join(x.id for x in card.backends)}") from None
    d = r.dispatcher.model_copy(update={"type": b.dispatcher_type, "backend": b.flex_backend})
    if b.dispatcher_type != "flex" and d.num_sms is not None:
        d = d.model_copy(update={"num_sms": None})  # the SM count belongs to flex cells only
    return r.model_copy(update={"dispatcher": d})


# -- rendering -------------------------------------------------------------------------

def _flags(obj: Any, table: tuple[tuple[str, str], ...]) -> list[str]:
    """Megatron args for `obj`'s fields, in table order: (field, flag) rows; a field that is None
    or False is left out, True gives the flag alone, anything else `flag value`."""
    out: list[str] = []
    for field_name, flag in table:
        value = getattr(obj, field_name)
        if value is None or value is False:
            continue
        out += [flag] if value is True else [flag, str(value)]
    return out


# Recipe field -> Megatron-LM flag, one table per run of plain fields; the code between them
# handles the flags that depend on more than one field.
MODEL_SHAPE = (("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"),
               ("ffn_hidden_size", "--ffn-hidden-size"), ("num_attention_heads", "--num-attention-heads"))
MODEL_POSITION = (("kv_channels", "--kv-channels"), ("max_position_embeddings", "--max-position-embeddings"),
                  ("position_embedding", "--position-embedding-type"))
YARN = (("scaling_factor", "--rotary-scaling-factor"),
        ("original_max_position_embeddings", "--yarn-original-max-position-embeddings"),
        ("mscale", "--mscale"), ("mscale_all_dim", "--mscale-all-dim"),
        ("beta_fast", "--yarn-beta-fast"), ("beta_slow", "--yarn-beta-slow"))
MODEL_NORM = (("normalization", "--normalization"), ("norm_epsilon", "--norm-epsilon"),
              ("qk_layernorm", "--qk-layernorm"), ("swiglu", "--swiglu"),
              ("untie_embeddings", "--untie-embeddings-and-output-weights"))
MLA = (("q_lora_rank", "--q-lora-rank"), ("kv_lora_rank", "--kv-lora-rank"), ("qk_head_dim", "--qk-head-dim"),
       ("qk_pos_emb_head_dim", "--qk-pos-emb-head-dim"), ("v_head_dim", "--v-head-dim"))
LINEAR_ATTENTION = (("variant", "--experimental-attention-variant"), ("freq", "--linear-attention-freq"),
                    ("key_head_dim", "--linear-key-head-dim"), ("value_head_dim", "--linear-value-head-dim"),
                    ("num_key_heads", "--linear-num-key-heads"), ("num_value_heads", "--linear-num-value-heads"),
                    ("conv_kernel_dim", "--linear-conv-kernel-dim"))
MOE_SIZE = (("num_experts", "--num-experts"), ("router_topk", "--moe-router-topk"),
            ("ffn_hidden_size", "--moe-ffn-hidden-size"))
MOE_ROUTER = (("shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size"),
              ("shared_expert_gate", "--moe-shared-expert-gate"),
              ("router_score_function", "--moe-router-score-function"),
              ("router_pre_softmax", "--moe-router-pre-softmax"),
              ("router_topk_scaling_factor", "--moe-router-topk-scaling-factor"),
              ("router_num_groups", "--moe-router-num-groups"), ("router_group_topk", "--moe-router-group-topk"),
              ("router_enable_expert_bias", "--moe-router-enable-expert-bias"),
              ("router_dtype", "--moe-router-dtype"), ("load_balancing_type", "--moe-router-load-balancing-type"),
              ("aux_loss_coeff", "--moe-aux-loss-coeff"), ("grouped_gemm", "--moe-grouped-gemm"))
PARALLELISM = (("tp", "--tensor-model-parallel-size"), ("pp", "--pipeline-model-parallel-size"),
               ("cp", "--context-parallel-size"), ("ep", "--expert-model-parallel-size"),
               ("etp", "--expert-tensor-parallel-size"), ("sequence_parallel", "--sequence-parallel"),
               ("layers_per_virtual_stage", "--num-layers-per-virtual-pipeline-stage"),
               ("pipeline_layout", "--pipeline-model-parallel-layout"),
               ("account_for_embedding_in_pipeline_split", "--account-for-embedding-in-pipeline-split"),
               ("account_for_loss_in_pipeline_split", "--account-for-loss-in-pipeline-split"))
TRAINING_BATCH = (("seq_length", "--seq-length"), ("micro_batch_size", "--micro-batch-size"),
                  ("global_batch_size", "--global-batch-size"), ("train_iters", "--train-iters"),
                  ("lr", "--lr"), ("min_lr", "--min-lr"))
TRAINING_LOOP = (("log_interval", "--log-interval"), ("eval_iters", "--eval-iters"),
                 ("eval_interval", "--eval-interval"), ("transformer_impl", "--transformer-impl"))
TOKENIZER = (("type", "--tokenizer-type"), ("model", "--tokenizer-model"))


def model_args(r: Recipe) -> list[str]:
    m = r.model
    a = _flags(m, MODEL_SHAPE)
    if m.num_query_groups is not None and m.num_query_groups != m.num_attention_heads:
        a += ["--group-query-attention", "--num-query-groups", str(m.num_query_groups)]
    a += _flags(m, MODEL_POSITION)
    if m.position_embedding == "rope":
        a += ["--rotary-base", str(m.rotary_base)]
        if m.rotary_percent != 1.0:
            a += ["--rotary-percent", str(m.rotary_percent)]
    a += _flags(m, (("rope_type", "--rope-type"),))
    if m.yarn is not None:
        a += _flags(m.yarn, YARN)
    a += _flags(m, MODEL_NORM)
    if not m.add_bias_linear:
        a.append("--disable-bias-linear")
    a += _flags(m, (("attention_output_gate", "--attention-output-gate"),))
    if m.mla is not None:
        a += ["--multi-latent-attention", *_flags(m.mla, MLA)]
    if m.linear_attention is not None:
        a += _flags(m.linear_attention, LINEAR_ATTENTION)
    a += _flags(m, (("mtp_num_layers", "--mtp-num-layers"),))
    a += _flags(m.moe, MOE_SIZE)
    if m.moe.layer_freq != 1:
        a += ["--moe-layer-freq", str(m.moe.layer_freq)]
    a += _flags(m.moe, MOE_ROUTER)
    return a + m.extra_args


def parallel_args(r: Recipe) -> list[str]:
    return _flags(r.parallelism, PARALLELISM)


def training_args(r: Recipe, transformer_impl: str | None = None) -> list[str]:
    t = r.training
    impl = transformer_impl or (t.transformer_impl if t.transformer_impl != "auto" else "local")
    t = t.model_copy(update={"transformer_impl": impl})
    a = _flags(t, TRAINING_BATCH)
    if t.precision != "fp32":
        a.append(f"--{t.precision}")
    return a + _flags(t, TRAINING_LOOP) + t.extra_args + (t.te_extra_args if impl == "transformer_engine" else [])


def data_args(r: Recipe) -> list[str]:
    d = r.data
    if d.source == "mock":
        a = ["--mock-data"]
    else:
        a = ["--data-path", *d.paths] + (["--split", d.split] if d.split is not None else [])
    a += _flags(d.tokenizer, TOKENIZER)
    if d.tokenizer.type == "NullTokenizer":
        a += ["--vocab-size", str(r.model.vocab_size)]
    return a


def probe_args(r: Recipe) -> list[str]:
    """The probe's own flags (`--moe-probe*`); empty when the recipe switches the probe off."""
    pr = r.probe
    if not pr.enabled:
        return []
    return probe_flags(
        interval=pr.interval or r.training.log_interval,
        out_dir=pr.dir or f"runs/moe-probe/{r.full_name.replace(':', '-')}",
        writers=pr.writers,
        timing=pr.timing,
        gpus_per_node=pr.gpus_per_node or r.parallelism.gpus_per_node,
    )


def render(r: Recipe, availability: Availability | None = None, include_probe: bool = False,
           resolved: Resolved | None = None) -> list[str]:
    """Megatron-LM arguments for the recipe (model, parallelism, dispatcher, training, data)."""
    resolved = resolved or resolve_dispatcher(r, availability)
    args = (model_args(r) + parallel_args(r) + resolved.megatron_lm + training_args(r, resolved.transformer_impl)
            + data_args(r))
    if include_probe:
        args += probe_args(r)
    return args


def bridge_overrides(r: Recipe, availability: Availability | None = None, resolved: Resolved | None = None) -> list[str]:
    """Megatron-Bridge `key=value` overrides (Bridge model.* keys are TransformerConfig fields)."""
    resolved = resolved or resolve_dispatcher(r, availability)
    p, t, m = r.parallelism, r.training, r.model
    ov: dict[str, Any] = {}
    if r.bridge.recipe is None:  # no Bridge recipe to supply the shape: spell it out
        ov.update({
            "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
            "model.ffn_hidden_size": m.ffn_hidden_size, "model.num_attention_heads": m.num_attention_heads,
            "model.num_query_groups": m.num_query_groups or m.num_attention_heads,
            "model.num_moe_experts": m.moe.num_experts, "model.moe_router_topk": m.moe.router_topk,
            "model.moe_ffn_hidden_size": m.moe.ffn_hidden_size, "model.vocab_size": m.vocab_size,
        })
    ov.update({
        "model.tensor_model_parallel_size": p.tp, "model.pipeline_model_parallel_size": p.pp,
        "model.context_parallel_size": p.cp, "model.expert_model_parallel_size": p.ep,
        "model.expert_tensor_parallel_size": p.etp, "model.sequence_parallel": p.sequence_parallel,
    })
    ov.update(resolved.bridge)
    ov.update({
        "model.seq_length": t.seq_length, "dataset.sequence_length": t.seq_length,
        "train.micro_batch_size": t.micro_batch_size, "train.global_batch_size": t.global_batch_size,
        "train.train_iters": t.train_iters, "logger.log_interval": t.log_interval,
    })
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in ov.items()]


def _shell_lines(args: list[str]) -> str:
    lines, cur = [], []
    for a in args:
        if a.startswith("--") and cur:
            lines.append(" ".join(shlex.quote(x) for x in cur))
            cur = []
        cur.append(a)
    if cur:
        lines.append(" ".join(shlex.quote(x) for x in cur))
    return " \\\n".join(lines)


def render_document(r: Recipe, availability: Availability, fmt: str, include_probe: bool) -> str:
    resolved = resolve_dispatcher(r, availability)
    mlm = render(r, include_probe=False, resolved=resolved)
    pargs = probe_args(r) if include_probe else []
    bridge = bridge_overrides(r, resolved=resolved)
    if fmt == "json":
        return json.dumps({
            "recipe": r.full_name, "world_size": r.parallelism.world_size,
            "megatron_lm_args": mlm, "probe_args": pargs, "bridge_overrides": bridge,
            "bridge_recipe": r.bridge.recipe, "env": resolved.env,
            "dispatcher": resolved.recommendation.to_dict(), "notes": resolved.notes,
        }, indent=2, default=str) + "\n"
    head = [f"# recipe {r.full_name}: {r.description.strip().splitlines()[0]}",
            f"# world size {r.parallelism.world_size} ({r.parallelism.nodes} node(s) x {r.parallelism.gpus_per_node} GPUs)"]
    head += [f"# {n}" for n in resolved.notes]
    head += [f"export {k}={v}" for k, v in resolved.env.items()]
    out = list(head)
    if fmt in ("megatron", "both"):
        out.append(_shell_lines(mlm + pargs))
    if fmt in ("bridge", "both"):
        if fmt == "both":
            out.append("")
        out.append("# Megatron-Bridge overrides" + (f" on top of {r.bridge.recipe}" if r.bridge.recipe else ""))
        out.append(" \\\n".join(bridge))
        if include_probe and r.probe.enabled:
            pr = r.probe
            out.append("")
            out += callback_source(pr.interval or r.training.log_interval, pr.writers,
                                   pr.dir or f"runs/moe-probe/{r.full_name.replace(':', '-')}", pr.timing,
                                   pr.gpus_per_node or r.parallelism.gpus_per_node)
    return "\n".join(out) + "\n"


def callback_source(interval: int, writers: list[str], out_dir: str, timing: bool | str,
                    gpus_per_node: int | None) -> list[str]:
    """The Python lines that add the probe to a Bridge training script (`moe-probe render --format
    bridge`): text only, the planner never imports the live adapter (megatron/bridge.py)."""
    return [
        "# the probe, as a Megatron-Bridge callback: Python for the training script",
        "from megatron_moe_probe.megatron.bridge import MoEProbeCallback",
        f"probe = MoEProbeCallback(interval={interval}, writers={list(writers)!r}, out_dir={out_dir!r}, "
        f"timing={timing!r}, gpus_per_node={gpus_per_node!r})",
        "pretrain(cfg, forward_step, callbacks=[probe])",
    ]
