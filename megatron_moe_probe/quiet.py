"""Silence the notices that tell a user of the CPU demo or of an offline tool nothing.

Only these exact messages, from the libraries' own loggers and warnings; every other warning
is kept. They are about the machine, not about the run:
- torch: "No CUDA runtime is found, using CUDA_HOME=..." (a CPU run on a machine with a CUDA
  toolkit; printed once per process, so once per demo rank);
- Megatron-Core: "GPTModel IS DEPRECATED ..." (the demo's model is ours to choose, not the user's);
- Megatron-Core: "Transformer Engine and Apex are not installed. Falling back to ..." (printed
  by four modules on import; the CPU paths and build-dataset never use those kernels);
- Megatron-Core: "absl.logging is not installed" (hyper_comm_grid, on import: logging works without it).
Call `quiet_cpu_notices()` before importing torch's cpp_extension or Megatron.
"""

from __future__ import annotations

import logging
import warnings

_LOGGER_MESSAGES = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
}
_WARNINGS = ("Transformer Engine and Apex are not installed", "absl.logging is not installed")


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not text.startswith(self.prefixes)


def quiet_cpu_notices() -> None:
    for name, prefixes in _LOGGER_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    for text in _WARNINGS:
        warnings.filterwarnings("ignore", message=text)
