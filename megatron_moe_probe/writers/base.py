"""The writer protocol, the fan-out that isolates failing writers, and the factory.

A writer receives every `IntervalReport` of a run (`write`), optionally the run
metadata once at the start (`write_meta`), and is closed once at the end. The
probe never talks to a writer directly: it talks to a `WriterSet`, which calls
each writer inside try/except. A writer that raises is reported once (one
warning on the "megatron_moe_probe" logger naming the writer and the error),
closed, and dropped; training and the other writers carry on, losing nothing.

This module imports no writer backend: `make_writers` imports each one only
when it is asked for, so a missing optional package (tensorboard, wandb,
pyarrow) costs one warning and nothing else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record import IntervalReport

log = logging.getLogger("megatron_moe_probe")

WRITER_NAMES = ("local", "tensorboard", "wandb", "console")
DEFAULT_WRITERS = ("local",)


@runtime_checkable
class Writer(Protocol):
    """Where interval reports go. `write_meta(meta: dict)` is optional (see WriterSet)."""

    name: str

    def write(self, report: IntervalReport) -> None: ...

    def close(self) -> None: ...


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class WriterSet:
    """Fan-out over writers. Never raises out of `write_meta`, `write` or `close`
    because of a writer (only KeyboardInterrupt/SystemExit pass through)."""

    def __init__(self, writers: Iterable[Any] = ()) -> None:
        self._writers: list[Any] = list(writers)
        self.dropped: dict[str, str] = {}  # writer name -> why it was dropped

    @property
    def names(self) -> list[str]:
        return [_name_of(w) for w in self._writers]

    def __len__(self) -> int:
        return len(self._writers)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._writers))

    def __bool__(self) -> bool:
        return bool(self._writers)

    def add(self, writer: Any) -> None:
        self._writers.append(writer)

    def write_meta(self, meta: dict[str, Any]) -> None:
        self._call_all("write_meta", meta, where="write_meta")

    def write(self, report: IntervalReport) -> None:
        self._call_all("write", report, where=f"write (step {report.step})")

    def close(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001 - a writer must not stop the others from closing
                log.warning("moe-probe: the %r writer failed to close (%s)", _name_of(writer), _describe(exc))

    def __enter__(self) -> "WriterSet":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call_all(self, method: str, arg: Any, where: str) -> None:
        for writer in list(self._writers):
            fn: Callable[[Any], None] | None = getattr(writer, method, None)
            if fn is None:
                continue
            try:
                fn(arg)
            except Exception as exc:  # noqa: BLE001 - isolate the failure, see module docstring
                self._drop(writer, where, exc)

    def _drop(self, writer: Any, where: str, exc: Exception) -> None:
        name = _name_of(writer)
        self._writers.remove(writer)
        self.dropped[name] = _describe(exc)
        log.warning(
            "moe-probe: the %r writer failed in %s (%s); it is dropped, training and the other writers continue",
            name,
            where,
            _describe(exc),
        )
        try:
            writer.close()
        except Exception as close_exc:  # noqa: BLE001 - already warned once for this writer
            log.debug("moe-probe: closing the failed %r writer also failed: %s", name, _describe(close_exc))


def _name_of(writer: Any) -> str:
    return str(getattr(writer, "name", type(writer).__name__))


def parse_writer_names(names: Iterable[str] | str | None) -> list[str]:
    """Normalize `["local", "tensorboard"]` or `"local,tensorboard"` to a de-duplicated list.
    Raises UsageError for an unknown name."""
    if names is None:
        return list(DEFAULT_WRITERS)
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in WRITER_NAMES:
                raise UsageError(f"unknown writer {name!r}; choose from: {', '.join(WRITER_NAMES)}")
            if name not in out:
                out.append(name)
    return out


def make_writers(
    names: Iterable[str] | str | None,
    out_dir: str | os.PathLike[str],
    run_meta: dict[str, Any] | None,
    *,
    heatmap_every: int = 10,
    rank: int = 0,
    tensorboard_writer: Any = None,
    wandb_project: str | None = None,
    wandb_mode: str | None = None,
    wandb_run_name: str | None = None,
    wandb_writer: Any = None,
    parquet_every: int = 0,
    console: Any = None,
) -> WriterSet:
    """Build the named writers for the run folder `out_dir` and send them `run_meta` once.

    names: any of "local", "tensorboard", "wandb", "console" (list or comma-separated);
        None means the default, ["local"]. Unknown names raise UsageError on every rank.
    rank: only rank 0 writes; any other rank gets an empty WriterSet.
    heatmap_every: TensorBoard/wandb add the [layer, expert] heatmap and per-layer
        histograms on every `heatmap_every`-th report (the 1st, then every N-th).
    tensorboard_writer: an existing SummaryWriter to log into (e.g. Megatron's
        `get_tensorboard_writer()`); it is flushed but not closed by us.
    wandb_project / wandb_mode / wandb_run_name: for a run we start ourselves; if a
        wandb run is already active (Megatron's `--wandb-project`), it is used as is.
        The mode defaults to $WANDB_MODE, else "offline".
    wandb_writer: an existing wandb run to log into (Megatron-Bridge's `state.wandb_logger`).
    parquet_every: also rewrite layers.parquet every N reports (0: only at close).
    console: a rich Console for the console writer (tests, or to send it to stderr).

    A writer that cannot be constructed (package missing, folder not writable) is
    skipped with one warning; the others are still built.
    """
    chosen = parse_writer_names(names)
    if heatmap_every < 1:
        raise UsageError(f"heatmap_every must be >= 1, got {heatmap_every}")
    writers = WriterSet()
    if rank != 0 or not chosen:
        return writers
    out = Path(out_dir)

    builders: dict[str, Callable[[], Any]] = {
        "local": lambda: _local(out, parquet_every),
        "tensorboard": lambda: _tensorboard(out, heatmap_every, tensorboard_writer),
        "wandb": lambda: _wandb(out, heatmap_every, wandb_project, wandb_mode, wandb_run_name, wandb_writer),
        "console": lambda: _console(console),
    }
    for name in chosen:
        try:
            writers.add(builders[name]())
        except Exception as exc:  # noqa: BLE001 - a writer that cannot start is skipped, see docstring
            hint = _INSTALL_HINTS.get(name, "") if isinstance(exc, ImportError) else ""
            log.warning(
                "moe-probe: cannot start the %r writer (%s)%s; continuing without it", name, _describe(exc), hint
            )
    if run_meta is not None:
        from megatron_moe_probe.grouping import group_keys

        # The keys runs are grouped and compared by, resolved once (grouping.py says where they go).
        writers.write_meta({**run_meta, "group": group_keys(run_meta)})
    return writers


_INSTALL_HINTS = {
    "tensorboard": " - install it with `pip install megatron-moe-probe[tensorboard]`",
    "wandb": " - install it with `pip install megatron-moe-probe[wandb]`",
}


def _local(out: Path, parquet_every: int) -> Any:
    from megatron_moe_probe.writers.local import LocalWriter

    return LocalWriter(out, parquet_every=parquet_every)


def _tensorboard(out: Path, heatmap_every: int, existing: Any) -> Any:
    from megatron_moe_probe.writers.tensorboard import TensorBoardWriter

    return TensorBoardWriter(out / "tensorboard", heatmap_every=heatmap_every, existing=existing)


def _wandb(out: Path, heatmap_every: int, project: str | None, mode: str | None, run_name: str | None,
           existing: Any) -> Any:
    from megatron_moe_probe.writers.wandb import WandbWriter

    return WandbWriter(out, heatmap_every=heatmap_every, project=project, mode=mode, run_name=run_name,
                       existing=existing)


def _console(console: Any) -> Any:
    from megatron_moe_probe.writers.console import ConsoleWriter

    return ConsoleWriter(console=console)
