"""Writers: where interval reports go (local store, TensorBoard, wandb, console)."""

# Only the backend-free parts are exported here; the backends (tensorboard, wandb,
# rich, matplotlib) are imported by `make_writers` when asked for.
from megatron_moe_probe.writers.base import WRITER_NAMES, Writer, WriterSet, make_writers, parse_writer_names
from megatron_moe_probe.writers.local import CorruptRunError, load_layer_table, load_run
from megatron_moe_probe.writers.meta import collect_run_meta

__all__ = [
    "WRITER_NAMES",
    "CorruptRunError",
    "Writer",
    "WriterSet",
    "collect_run_meta",
    "load_layer_table",
    "load_run",
    "make_writers",
    "parse_writer_names",
]
