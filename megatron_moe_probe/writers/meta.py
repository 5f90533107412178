"""Run metadata for the writers: args, versions, hardware, dispatcher.

`collect_run_meta` gathers what a comparison between runs needs to know, as the typed run
description (record/run_meta.RunMeta): the framework's own arguments (Megatron's namespace,
Bridge's config as a dict) become its typed `settings` here, at write time. It does
not import torch or Megatron itself: it reports torch's devices only when torch is
already imported by the caller (the training process), and versions from the
installed distributions' metadata.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import time
from typing import Any

from megatron_moe_probe.record import to_json_safe
from megatron_moe_probe.record.run_meta import MetaError, validate_meta, with_settings
from megatron_moe_probe.versions import installed_version, megatron_core_version

log = logging.getLogger("megatron_moe_probe")

_DISTRIBUTIONS = (
    "megatron-moe-probe",
    "megatron-core",
    "torch",
    "transformer-engine",
    "deep_ep",
    "numpy",
    "tensorboard",
    "wandb",
    "pyarrow",
)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    out.update((dist, installed_version(dist)) for dist in _DISTRIBUTIONS)
    out["megatron-core"] = megatron_core_version()  # a checkout on PYTHONPATH, not a wheel beside it
    return out


def hardware() -> dict[str, Any]:
    out: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                out["cuda"] = torch.version.cuda
                out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            else:
                out["gpus"] = []
        except Exception as exc:  # noqa: BLE001 - metadata must never stop a run
            out["gpus_error"] = f"{type(exc).__name__}: {exc}"
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID", "SLURM_NNODES"):
        if var in os.environ:
            out[var.lower()] = os.environ[var]
    return out


def collect_run_meta(
    args: Any = None, *, dispatcher: str | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Metadata of this run as plain JSON data.

    args: Megatron's argparse Namespace (or a dict); stored whole under "args".
    dispatcher: the token dispatcher; defaults to args.moe_token_dispatcher_type.
    extra: merged in at the top level (probe settings, recipe name, ...).
    The typed `settings` (and `settings_from`) are filled from `args` (RunMeta).
    """
    arg_dict = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
    meta: dict[str, Any] = {
        "created": time.time(),
        "command": list(sys.argv),
        "dispatcher": dispatcher or arg_dict.get("moe_token_dispatcher_type"),
        "versions": versions(),
        "hardware": hardware(),
        "args": to_json_safe(arg_dict),
    }
    if extra:
        meta.update(to_json_safe(extra))
    meta = with_settings(meta)
    try:
        validate_meta(meta, "run metadata")  # a framework handing over a wrong type is our bug: say so now
    except MetaError as exc:  # ... but never into the training loop
        log.warning("moe-probe: %s", exc)
    return meta
