"""Settings the project reads from environment variables, parsed by type in one place.

- `MOE_PROBE_GROUP_KEYS`: JSON object of grouping keys (grouping.KEYS) to scalars; `moe-probe
  matrix` sets it per cell. A value that is not such an object is a mistake: the CLI refuses it
  with one line before anything starts (`check_environment`); inside a training process it is
  ignored with one warning (the probe never stops training).
- `WANDB_RUN_GROUP`: wandb's own group name.
- `MOE_PROBE_TRACEBACK`: any non-empty value shows the traceback of an internal error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from pydantic import RootModel, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record.problems import describe

log = logging.getLogger("megatron_moe_probe")

GROUP_ENV = "WANDB_RUN_GROUP"
KEYS_ENV = "MOE_PROBE_GROUP_KEYS"
TRACEBACK_ENV = "MOE_PROBE_TRACEBACK"
KEYS = ("group", "dispatcher", "backend", "ep", "tp", "hardware", "recipe", "data")

Scalar = StrictStr | StrictInt | StrictFloat | StrictBool | None


class GroupKeys(RootModel[dict[str, Scalar]]):
    """$MOE_PROBE_GROUP_KEYS: {key: scalar}; keys outside grouping.KEYS are a mistake."""


class EnvironmentError_(UsageError):
    """An environment variable the project reads holds something it cannot use."""


def parse_group_keys(text: str) -> dict[str, Any]:
    """The keys of $MOE_PROBE_GROUP_KEYS (EnvironmentError_ naming the variable otherwise)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise EnvironmentError_(f"${KEYS_ENV} is not valid JSON ({exc}); want an object such as "
                                '{"dispatcher": "alltoall", "ep": 8}') from None
    if not isinstance(data, dict):
        raise EnvironmentError_(f"${KEYS_ENV} is a JSON {type(data).__name__}; want an object such as "
                                '{"dispatcher": "alltoall", "ep": 8}')
    try:
        keys = GroupKeys.model_validate(data).root
    except ValidationError as exc:
        raise EnvironmentError_(f"${KEYS_ENV}: {describe(exc)} (values are strings, numbers or null)") from None
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        raise EnvironmentError_(f"${KEYS_ENV}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    return {k: v for k, v in keys.items() if v is not None}


_warned: set[str] = set()


def group_keys_from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """The keys of $MOE_PROBE_GROUP_KEYS, or {} (with one warning) when it cannot be used:
    the writing side must never fail on it (the CLI checked it before starting)."""
    text = env.get(KEYS_ENV)
    if not text:
        return {}
    try:
        return parse_group_keys(text)
    except EnvironmentError_ as exc:
        if text not in _warned:
            _warned.add(text)
            log.warning("moe-probe: %s; grouping keys from the run itself are used", exc)
        return {}


def check_environment(env: Mapping[str, str] | None = None) -> None:
    """Every variable this project reads, checked before a command starts (UsageError)."""
    env = os.environ if env is None else env
    if env.get(KEYS_ENV):
        parse_group_keys(env[KEYS_ENV])
