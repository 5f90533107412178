"""Writers: where interval reports go (local run folder, TensorBoard, wandb, console).

Only the backend-free parts are exported here; the backends (tensorboard, wandb, rich,
matplotlib) are imported by `make_writers` when asked for. Reading runs back is
`megatron_moe_probe.record`'s job, not a writer's.
"""

from megatron_moe_probe.writers.base import WRITER_NAMES, Writer, WriterSet, make_writers, parse_writer_names
from megatron_moe_probe.writers.meta import collect_run_meta

__all__ = [
    "WRITER_NAMES",
    "Writer",
    "WriterSet",
    "collect_run_meta",
    "make_writers",
    "parse_writer_names",
]
