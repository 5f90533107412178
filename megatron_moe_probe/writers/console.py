"""Console writer: a compact per-layer table (rich) printed for every report.

Columns: layer, tokens, max/mean over the interval and its per-step mean and worst,
gini, cv, entropy, dead experts, per-EP-rank max/mean, receiver skew, inter-node
share, dropped tokens and share; dispatch/combine milliseconds only when the report
has them. A statistic the report lacks, or that is NaN, prints as '-'.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from megatron_moe_probe.record import PHASES, IntervalReport, timing_stat
from megatron_moe_probe.values import MISSING, is_missing


def fmt_count(value: Any) -> str:
    return f"{int(round(float(value))):,}"


def fmt_ratio(value: Any) -> str:
    return f"{float(value):.3f}"


def fmt_percent(value: Any) -> str:
    return f"{100.0 * float(value):.1f}%"


def fmt_ms(value: Any) -> str:
    return f"{float(value):.2f}"


# (header, per_layer key, formatter), in display order.
COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("tokens", "tokens", fmt_count),
    ("max/mean", "max_over_mean", fmt_ratio),
    ("step-mean", "max_over_mean_step_mean", fmt_ratio),
    ("step-worst", "max_over_mean_step_worst", fmt_ratio),
    ("gini", "gini", fmt_ratio),
    ("cv", "cv", fmt_ratio),
    ("entropy", "entropy", fmt_ratio),
    ("dead", "dead_experts", fmt_count),
    ("rank max/mean", "rank_max_over_mean", fmt_ratio),
    ("recv skew", "receiver_skew", fmt_ratio),
    ("inter-node", "inter_node_fraction", fmt_percent),
    ("dropped", "dropped_tokens", fmt_count),
    ("drop %", "dropped_fraction", fmt_percent),
)
# Shown only when at least one layer of the report has a value.
TIMING_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = tuple(
    (f"{phase.replace('_', ' ')} ms", timing_stat(phase), fmt_ms) for phase in PHASES
)


def _present(value: Any) -> bool:
    return not is_missing(value)


def cell(row: dict[str, Any], key: str, formatter: Callable[[Any], str]) -> str:
    value = row.get(key)
    return formatter(value) if _present(value) else MISSING


def table_columns(report: IntervalReport) -> list[tuple[str, str, Callable[[Any], str]]]:
    timing = [c for c in TIMING_COLUMNS if any(_present(row.get(c[1])) for row in report.per_layer)]
    return [*COLUMNS, *timing]


def table_rows(report: IntervalReport) -> list[list[str]]:
    """The table as text cells, first cell the layer number."""
    columns = table_columns(report)
    return [
        [str(layer), *(cell(row, key, f) for _, key, f in columns)]
        for layer, row in zip(report.layers, report.per_layer)
    ]


class ConsoleWriter:
    name = "console"

    def __init__(self, console: Any = None, *, width: int = 200) -> None:
        from rich.console import Console

        if console is None:
            # Logs are not terminals: rich would assume 80 columns and squeeze the table.
            console = Console(highlight=False, width=None if sys.stdout.isatty() else width)
        self.console = console

    def write(self, report: IntervalReport) -> None:
        from rich.table import Table
        from rich import box

        title = (
            f"moe-probe step {report.step} ({report.steps} steps, "
            f"{report.num_experts} experts, EP={report.ep_size})"
        )
        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
        table.add_column("layer", justify="right", no_wrap=True)
        for header, _, _ in table_columns(report):
            table.add_column(header, justify="right", no_wrap=True)
        for cells in table_rows(report):
            table.add_row(*cells)
        self.console.print(table)

    def close(self) -> None:
        pass
