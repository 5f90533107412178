"""The [layer, expert] load heatmap shared by the TensorBoard and wandb writers.

Each cell is the tokens an expert received in the interval divided by the mean
over that layer's experts, so 1.0 is perfect balance whatever the layer's volume,
and one colour scale fits every layer. A layer with no tokens is blank (NaN).

Rendering uses matplotlib's object API with the Agg canvas (no pyplot, no global
figure state, no display needed).
"""

from __future__ import annotations

import io
import math
from typing import Any

from megatron_moe_probe.record import IntervalReport


def load_over_mean(report: IntervalReport) -> list[list[float]]:
    """[layer][expert] tokens / mean tokens of the layer (NaN for a layer without tokens)."""
    out: list[list[float]] = []
    for counts in report.tokens_per_expert:
        mean = sum(counts) / len(counts) if counts else 0.0
        out.append([c / mean if mean > 0 else math.nan for c in counts])
    return out


def heatmap_figure(report: IntervalReport, *, title: str | None = None) -> Any:
    """A matplotlib Figure (Agg canvas attached) of `load_over_mean(report)`."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.array(load_over_mean(report), dtype=float).reshape(len(report.tokens_per_expert), -1)
    num_layers, num_experts = data.shape
    width = min(16.0, 3.0 + 0.12 * max(num_experts, 8))
    height = min(12.0, 1.6 + 0.28 * max(num_layers, 2))
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = data[np.isfinite(data)]
    vmax = max(2.0, float(finite.max())) if finite.size else 2.0
    cmap = _colormap()
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0, vmax=vmax)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(num_layers))
    ax.set_yticklabels([str(n) for n in report.layers])
    first = int(report.step) - int(report.steps) + 1
    ax.set_title(title or f"expert load / layer mean\niterations {first}–{report.step}", fontsize="medium")
    fig.colorbar(image, ax=ax, label="load / mean (1 = balanced)")
    fig.tight_layout()
    return fig


def _colormap() -> Any:
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")


def heatmap_rgb(report: IntervalReport) -> Any:
    """The heatmap as an [H, W, 3] uint8 numpy array (TensorBoard add_image with HWC, wandb.Image)."""
    import numpy as np

    fig = heatmap_figure(report)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return rgba[..., :3].copy()


def heatmap_png(report: IntervalReport) -> bytes:
    """The heatmap as PNG bytes."""
    fig = heatmap_figure(report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
