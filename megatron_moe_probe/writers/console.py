"""Console writer: a compact per-layer table (rich) printed for every report.

Columns: layer, tok×topk (token-to-expert assignments: each token counts once per expert
it is routed to, so tokens × top-k), max/mean over the interval and its per-step mean and
worst, gini, cv, entropy, dead experts, per-EP-rank max/mean, inter-node share, dropped
tokens and share; dispatch/combine milliseconds only when the report has them. Receiver
skew (from the rank-to-rank matrix) equals the per-EP-rank max/mean whenever the matrix's
column sums are the experts' counts, which is the usual case: its column is shown only when
some layer's two values differ. A statistic the report lacks, or that is NaN, prints as '-'.
"""

from __future__ import annotations

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
    ("tok×topk", "tokens", fmt_count),  # assignments, not tokens: see the module docstring
    ("max/\nmean", "max_over_mean", fmt_ratio),
    ("step\nmean", "max_over_mean_step_mean", fmt_ratio),
    ("step\nworst", "max_over_mean_step_worst", fmt_ratio),
    ("gini", "gini", fmt_ratio),
    ("cv", "cv", fmt_ratio),
    ("entropy", "entropy", fmt_ratio),
    ("dead", "dead_experts", fmt_count),
    ("rank\nmax/mean", "rank_max_over_mean", fmt_ratio),
    ("recv\nskew", "receiver_skew", fmt_ratio),
    ("inter\nnode", "inter_node_fraction", fmt_percent),
    ("dropped", "dropped_tokens", fmt_count),
    ("drop\n%", "dropped_fraction", fmt_percent),
)
# Shown only when at least one layer of the report has a value.
TIMING_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = tuple(
    (f"{phase.replace('_', chr(10))}\nms", timing_stat(phase), fmt_ms) for phase in PHASES
)


def _present(value: Any) -> bool:
    return not is_missing(value)


def cell(row: dict[str, Any], key: str, formatter: Callable[[Any], str]) -> str:
    value = row.get(key)
    return formatter(value) if _present(value) else MISSING


def _same_as_rank_load(report: IntervalReport) -> bool:
    """receiver_skew equals rank_max_over_mean (to the 3 decimals shown) in every layer."""
    return all(fmt_ratio(row["receiver_skew"]) == fmt_ratio(row["rank_max_over_mean"])
               for row in report.per_layer
               if _present(row.get("receiver_skew")) and _present(row.get("rank_max_over_mean")))


def table_columns(report: IntervalReport) -> list[tuple[str, str, Callable[[Any], str]]]:
    """The columns with a value in at least one layer (no capacity factor: no drop columns;
    no timing: no dispatch/combine ms), so that the table fits an 80-column terminal; receiver
    skew only where it differs from the per-rank max/mean."""
    redundant = {"receiver_skew"} if _same_as_rank_load(report) else set()
    return [c for c in (*COLUMNS, *TIMING_COLUMNS)
            if c[1] not in redundant and any(_present(row.get(c[1])) for row in report.per_layer)]


def table_rows(report: IntervalReport) -> list[list[str]]:
    """The table as text cells, first cell the layer number."""
    columns = table_columns(report)
    return [
        [str(layer), *(cell(row, key, f) for _, key, f in columns)]
        for layer, row in zip(report.layers, report.per_layer)
    ]


def pack_columns(costs: list[int], base: int, width: int, first: int = 0) -> list[list[int]]:
    """Columns first, first+1, ... (costs[k]: column first+k's width with its separator) in
    consecutive groups that each fit `width` beside `base` (the repeated key columns); a group
    holds at least one column, however wide."""
    chunks: list[list[int]] = [[]]
    used = base
    for k, cost in enumerate(costs):
        if chunks[-1] and used + cost > width:
            chunks.append([])
            used = base
        chunks[-1].append(first + k)
        used += cost
    return chunks


def print_integrity(console: Any, summary: dict | None, prefix: str = "") -> None:
    """A run's dispatch integrity (integrity_report.run_summary) in one line: red where the
    exchange went wrong, yellow where part of it went unchecked."""
    if summary:
        style = {"violated": "bold red", "unchecked": "yellow"}.get(summary["state"], "green")
        console.print(prefix + summary["line"], style=style, markup=False, highlight=False)


def column_chunks(headers: list[str], rows: list[list[str]], width: int) -> list[list[int]]:
    """Indices of columns 1.. (column 0, the key, is repeated in every part) in groups that each
    fit `width` characters with one space between columns: a table too wide for the terminal is
    printed as several tables, never with cut or folded cells."""
    def need(j: int) -> int:
        header = max(len(line) for line in headers[j].splitlines())
        return max([header, *(len(r[j]) for r in rows)]) + 1

    return pack_columns([need(j) for j in range(1, len(headers))], need(0) + 1, width, first=1)


class ConsoleWriter:
    name = "console"

    def __init__(self, console: Any = None, *, width: int | None = None) -> None:
        from rich.console import Console

        if console is None:
            # The terminal's width (80 in a log, or $COLUMNS); two-line headers and one space
            # between columns keep the table inside 80 columns, timing columns fold if need be.
            console = Console(highlight=False, width=width)
        self.console = console

    def write(self, report: IntervalReport) -> None:
        from rich import box
        from rich.table import Table

        title = (
            f"moe-probe step {report.step} ({report.steps} steps, "
            f"{report.num_experts} experts, EP={report.ep_size})"
        )
        columns = table_columns(report)
        rows = table_rows(report)
        headers = ["layer", *(header for header, _, _ in columns)]
        for part, chunk in enumerate(column_chunks(headers, rows, self.console.width)):
            table = Table(title=title if part == 0 else None, box=box.SIMPLE_HEAD, title_justify="left",
                          pad_edge=False, padding=0)  # the box draws one space between columns
            for j in (0, *chunk):
                table.add_column(headers[j], justify="right", no_wrap=True)
            for cells in rows:
                table.add_row(*(cells[j] for j in (0, *chunk)))
            self.console.print(table)

    def close(self) -> None:
        pass
