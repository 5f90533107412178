"""TensorBoard writer: per-layer scalar series every report; per-layer histograms of
tokens per expert and the [layer, expert] heatmap image every `heatmap_every` reports.

Tags: `moe/layer_NN/<stat>` and `moe/all/<stat>_layer_{mean,max}` (IntervalReport.scalars()),
`moe_hist/layer_NN/tokens_per_expert`, `moe_heatmap/load_over_mean`; the x axis is the
training iteration (report.step).
"""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_moe_probe.record import IntervalReport
from megatron_moe_probe.writers.heatmap import heatmap_rgb

HEATMAP_TAG = "moe_heatmap/load_over_mean"
HIST_TAG = "moe_hist/{layer}/tokens_per_expert"


class TensorBoardWriter:
    """Logs into `existing` (e.g. Megatron's get_tensorboard_writer(); flushed, never closed
    by us) or into a SummaryWriter of its own under `log_dir`."""

    name = "tensorboard"

    def __init__(
        self, log_dir: str | os.PathLike[str] | None = None, *, heatmap_every: int = 10, existing: Any = None
    ) -> None:
        if heatmap_every < 1:
            raise ValueError(f"heatmap_every must be >= 1, got {heatmap_every}")
        self.heatmap_every = heatmap_every
        self._count = 0
        if existing is not None:
            self._tb = existing
            self._owned = False
        else:
            if log_dir is None:
                raise ValueError("TensorBoardWriter needs log_dir or an existing writer")
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            os.makedirs(log_dir, exist_ok=True)
            self._tb = SummaryWriter(log_dir=os.fspath(log_dir))
            self._owned = True

    @property
    def log_dir(self) -> str | None:
        get = getattr(self._tb, "get_logdir", None)
        return get() if callable(get) else None

    def write_meta(self, meta: dict[str, Any]) -> None:
        from megatron_moe_probe.record import to_json_safe

        text = json.dumps(to_json_safe(meta), indent=2, sort_keys=True)
        # Indented by four spaces: TensorBoard renders text as markdown, this keeps it verbatim.
        self._tb.add_text("moe_probe/run_meta", "\n".join("    " + line for line in text.splitlines()), 0)

    def write(self, report: IntervalReport) -> None:
        step = int(report.step)
        for tag, value in report.scalars().items():
            self._tb.add_scalar(tag, value, step)
        if self._count % self.heatmap_every == 0:
            self._write_distributions(report, step)
        self._count += 1
        self._tb.flush()

    def _write_distributions(self, report: IntervalReport, step: int) -> None:
        import numpy as np

        for name, counts in zip(report.layer_names(), report.tokens_per_expert):
            if counts:
                self._tb.add_histogram(HIST_TAG.format(layer=name), np.asarray(counts, dtype=np.float64), step)
        if report.tokens_per_expert:
            self._tb.add_image(HEATMAP_TAG, heatmap_rgb(report), step, dataformats="HWC")

    def close(self) -> None:
        if self._owned:
            self._tb.close()
        else:
            self._tb.flush()
