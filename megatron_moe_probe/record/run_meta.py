"""`RunMeta`: the typed description of a run that meta.json holds.

Each framework fills it at write time (`writers/meta.collect_run_meta` for Megatron's
arguments and Bridge's config, the demo's model config through `make_writers`):
`settings` holds what readers need (dispatcher, EP, hidden size, top-k, batch, precision,
data, ...) and `settings_from` where each value came from. Readers use `settings_of(meta)`
and nothing else: no module digs into Megatron's argument namespace.

Old run folders (written before `settings` existed) stay readable: their settings are derived
once, here, from the three places they used to live (Megatron's `args`, the demo's `model`,
the launch `command`). `args` itself is still written, for people; no code reads it but this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record.problems import describe

PositiveInt = Annotated[StrictInt, Field(ge=1, le=(1 << 62))]


class RunSettings(BaseModel):
    """The model and parallel settings of a run that analyses and comparisons read."""

    model_config = ConfigDict(extra="allow")

    dispatcher: StrictStr | None = None  # Megatron's --moe-token-dispatcher-type
    flex_backend: StrictStr | None = None  # --moe-flex-dispatcher-backend (flex only)
    num_experts: PositiveInt | None = None
    topk: PositiveInt | None = None
    hidden_size: PositiveInt | None = None
    num_layers: PositiveInt | None = None
    micro_batch_size: PositiveInt | None = None
    global_batch_size: PositiveInt | None = None
    seq_length: PositiveInt | None = None
    expert_parallel: PositiveInt | None = None
    tensor_parallel: PositiveInt | None = None
    context_parallel: PositiveInt | None = None
    pipeline_parallel: PositiveInt | None = None
    gpus_per_node: PositiveInt | None = None
    precision: Literal["bf16", "fp16", "fp32"] | None = None
    data: StrictStr | None = None  # mock, text, random, or the dataset folder names of --data-path


class Hardware(BaseModel):
    model_config = ConfigDict(extra="allow")

    hostname: StrictStr | None = None
    platform: StrictStr | None = None
    cpu_count: StrictInt | None = None
    cuda: StrictStr | None = None
    gpus: list[StrictStr] | None = None


class RunMeta(BaseModel):
    """meta.json. Unknown blocks are kept (a newer writer's), known ones must have their types."""

    model_config = ConfigDict(extra="allow")

    created: StrictFloat | StrictInt | None = None
    command: list[StrictStr] = []
    job: StrictStr | None = None
    framework: StrictStr | None = None
    dispatcher: StrictStr | list[StrictStr] | None = None
    data: StrictStr | None = None
    recipe: StrictStr | dict[str, Any] | None = None
    world_size: PositiveInt | None = None
    versions: dict[str, StrictStr | None] = {}
    hardware: Hardware | None = None
    probe: dict[str, Any] | None = None
    group: dict[str, Any] | None = None
    domains: dict[str, Any] | None = None
    imported: dict[str, Any] | None = None
    store: dict[str, Any] | None = None
    settings: RunSettings | None = None
    settings_from: dict[str, StrictStr] | None = None
    args: dict[str, Any] | None = None  # Megatron's whole namespace, for people (see module docstring)
    model: dict[str, Any] | None = None  # the demo's model config, for people


class MetaError(UsageError, ValueError):
    """meta.json (or a meta dict: a wandb run's config) whose fields do not have their types."""


def validate_meta(meta: Any, where: str = "meta.json") -> RunMeta:
    if not isinstance(meta, dict):
        raise MetaError(f"{where}: not a JSON object (a {type(meta).__name__})")
    try:
        return RunMeta.model_validate(meta)
    except ValidationError as exc:
        raise MetaError(f"{where}: {describe(exc)}") from None


# ---------------------------------------------------------------------------- old spellings

# setting -> (key in Megatron's args, key in the demo's model config, flag of the launch command)
_SPELLINGS: dict[str, tuple[str, str | None, str | None]] = {
    "dispatcher": ("moe_token_dispatcher_type", None, "--moe-token-dispatcher-type"),
    "flex_backend": ("moe_flex_dispatcher_backend", None, "--moe-flex-dispatcher-backend"),
    "num_experts": ("num_experts", "num_experts", "--num-experts"),
    "topk": ("moe_router_topk", "topk", "--moe-router-topk"),
    "hidden_size": ("hidden_size", "hidden_size", "--hidden-size"),
    "num_layers": ("num_layers", "num_layers", "--num-layers"),
    "micro_batch_size": ("micro_batch_size", "micro_batch_size", "--micro-batch-size"),
    "global_batch_size": ("global_batch_size", None, "--global-batch-size"),
    "seq_length": ("seq_length", "seq_length", "--seq-length"),
    "expert_parallel": ("expert_model_parallel_size", "ep", "--expert-model-parallel-size"),
    "tensor_parallel": ("tensor_model_parallel_size", "tp", "--tensor-model-parallel-size"),
    "context_parallel": ("context_parallel_size", None, "--context-parallel-size"),
    "pipeline_parallel": ("pipeline_model_parallel_size", None, "--pipeline-model-parallel-size"),
    "gpus_per_node": ("moe_probe_gpus_per_node", None, "--moe-probe-gpus-per-node"),
}
_TEXT = ("dispatcher", "flex_backend")


def command_flag(command: list[str], flag: str) -> str | None:
    """Value of the last occurrence of `flag` (argparse keeps the last one)."""
    value = None
    for i, item in enumerate(command):
        if item == flag and i + 1 < len(command):
            value = command[i + 1]
        elif item.startswith(flag + "="):
            value = item.split("=", 1)[1]
    return value


def _as_setting(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return None
    if name in _TEXT:
        return str(value)
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if 1 <= number <= (1 << 62) else None


def _data_from(args: dict[str, Any], command: list[str]) -> str | None:
    if args.get("mock_data") or "--mock-data" in command:
        return "mock"
    paths = args.get("data_path")
    if not paths and "--data-path" in command:
        paths = []
        for c in command[command.index("--data-path") + 1:]:
            if c.startswith("--"):
                break
            paths.append(c)
    if paths:
        names = [Path(str(p)).name for p in (paths if isinstance(paths, list) else [paths])
                 if not str(p).replace(".", "").isdigit()]  # weights of a blend are numbers
        return ",".join(names) or None
    return None


def derive_settings(args: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
                    command: list[str] | None = None, data: str | None = None) -> tuple[dict, dict]:
    """(settings, where each came from) from a framework's own description of a run: Megatron's
    args (or Bridge's config as a dict), the demo's model config, the launch command line."""
    args, model, command = args or {}, model or {}, [str(c) for c in command or []]
    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, (arg_key, model_key, flag) in _SPELLINGS.items():
        for value, source in ((args.get(arg_key), f"meta args.{arg_key}"),
                              (model.get(model_key) if model_key else None, f"meta model.{model_key}"),
                              (command_flag(command, flag) if flag else None, f"meta command {flag}")):
            value = _as_setting(name, value)
            if value is not None:
                settings[name], sources[name] = value, source
                break
    if args.get("bf16") or args.get("fp16"):
        settings["precision"], sources["precision"] = ("bf16" if args.get("bf16") else "fp16"), "meta args bf16/fp16"
    elif "--bf16" in command or "--fp16" in command:
        settings["precision"] = "bf16" if "--bf16" in command else "fp16"
        sources["precision"] = "meta command --bf16/--fp16"
    elif args or model:
        settings["precision"], sources["precision"] = "fp32", "meta: no bf16/fp16, fp32"
    found = data if isinstance(data, str) else _data_from(args, command)
    if found is not None:
        settings["data"], sources["data"] = found, ("meta data" if isinstance(data, str) else "meta args/command")
    return settings, sources


def settings_of(meta: dict[str, Any]) -> tuple[RunSettings, dict[str, str]]:
    """The typed settings of a run's meta and where each came from: `settings` as written, or,
    for a folder written before it existed, derived from its args / model / command."""
    if isinstance(meta.get("settings"), dict):
        try:
            return RunSettings.model_validate(meta["settings"]), dict(meta.get("settings_from") or {})
        except ValidationError as exc:
            raise MetaError(f"meta.json: settings: {describe(exc)}") from None
    args = meta.get("args") if isinstance(meta.get("args"), dict) else None
    model = meta.get("model") if isinstance(meta.get("model"), dict) else None
    command = meta.get("command") if isinstance(meta.get("command"), list) else None
    settings, sources = derive_settings(args, model, command, meta.get("data"))
    if settings.get("dispatcher") is None and isinstance(meta.get("dispatcher"), str):
        settings["dispatcher"], sources["dispatcher"] = meta["dispatcher"], "meta dispatcher"
    return RunSettings.model_validate(settings), sources


def with_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with its typed `settings` (and their sources) filled in: what is written."""
    settings, sources = settings_of(meta)
    return {**meta, "settings": settings.model_dump(exclude_none=True), "settings_from": sources}


def requested_backend(meta: dict[str, Any]) -> str | None:
    """The backend a run asked for: its settings' dispatcher (flex: the flex backend), else the
    meta's dispatcher when it names one."""
    settings, _ = settings_of(meta)
    kind = settings.dispatcher or meta.get("dispatcher")
    if isinstance(kind, list):
        kind = kind[0] if len(kind) == 1 else None
    if kind == "flex":
        return settings.flex_backend
    return kind


def backends_that_ran(records: list[dict[str, Any]]) -> list[str]:
    """The distinct backends the probe's runtime records show ('unknown:<class>' where the class
    is not known)."""
    seen = []
    for r in records:
        b = r.get("backend") or f"unknown:{r.get('flex_manager') or r.get('dispatcher_class')}"
        if b not in seen:
            seen.append(b)
    return seen
