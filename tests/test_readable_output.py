"""Output that cannot be misread (issue 25): names that say what they count, no column shown
twice, titles that name what they show, tables that fit 80 columns without breaking a word,
plots where no run hides another and a 1.0 vs 1.3 difference shows."""

from __future__ import annotations

import copy
import io
import json
import re
import tomllib
from pathlib import Path

import pytest
from rich.console import Console

from megatron_moe_probe import cli
from megatron_moe_probe.record import load_run
from megatron_moe_probe.writers.console import ConsoleWriter, table_columns

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
RUN = DATA / "h200_run_mock"


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib Figure saved during the test, in order."""
    from matplotlib.figure import Figure

    saved = []
    real = Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def _report():
    return load_run(RUN)[1][-1]


def _console_text(report) -> str:
    console = Console(width=80, file=io.StringIO(), record=True)
    ConsoleWriter(console).write(report)
    return console.export_text()


def test_console_names_assignments_not_tokens():
    report = _report()
    text = _console_text(report)
    header = [c[0] for c in table_columns(report)]
    assert "tok×topk" in header and "tokens" not in header
    # The number under it is tokens x top-k: iterations x global batch x sequence x top-k.
    meta, _ = load_run(RUN)
    topk = report.meta.get("topk") or meta.get("args", {}).get("moe_router_topk")
    assert sum(report.tokens_per_expert[0]) % topk == 0
    assert f"{sum(report.tokens_per_expert[0]):,}" in text


def test_receiver_skew_is_shown_only_where_it_differs_from_rank_load():
    report = _report()
    assert all(f"{r['receiver_skew']:.3f}" == f"{r['rank_max_over_mean']:.3f}" for r in report.per_layer)
    keys = [c[1] for c in table_columns(report)]
    assert "rank_max_over_mean" in keys and "receiver_skew" not in keys
    different = copy.deepcopy(report)
    different.per_layer[0]["receiver_skew"] = different.per_layer[0]["rank_max_over_mean"] + 0.25
    assert "receiver_skew" in [c[1] for c in table_columns(different)]


def test_heatmap_titles_give_the_iterations_they_show(figures, tmp_path):
    from megatron_moe_probe.commands.demo import plot_run
    from megatron_moe_probe.writers.heatmap import heatmap_figure

    _, reports = load_run(RUN)
    last = reports[-1]
    span = f"iterations {last.step - last.steps + 1}–{last.step}"
    assert span in heatmap_figure(last).axes[0].get_title()
    plot_run(tmp_path, reports)
    assert span in figures[-1].axes[2].get_title()


def _analyze_text(capsys, monkeypatch, *argv) -> str:
    monkeypatch.delenv("COLUMNS", raising=False)  # piped: rich takes 80 columns
    assert cli.main(["analyze", *map(str, argv)]) == 0
    return capsys.readouterr().out


def _render(result: dict, width: int) -> str:
    from megatron_moe_probe.commands.analyze_output import print_result

    console = Console(width=width, file=io.StringIO(), record=True)
    print_result(result, console=console)
    return console.export_text()


@pytest.mark.parametrize("run", [RUN, ROOT / "examples" / "router_trace"])
def test_analyze_never_breaks_a_word_at_80_columns(capsys, monkeypatch, run):
    result = json.loads(_analyze_text(capsys, monkeypatch, run, "--hidden-size", "64", "--json"))
    narrow, wide = _render(result, 80), _render(result, 400)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    # Wrapping at spaces only moves whole words to the next line; folding a word makes pieces
    # ("contigu" + "ous", "balance" + "d", "penalt" + "y") that the unwrapped output never has.
    pieces = {t for t in set(narrow.split()) - set(wide.split()) if t.strip("─")}  # rules differ in length
    assert not pieces, sorted(pieces)
    # What a pipe gets is the 80-column rendering.
    assert _analyze_text(capsys, monkeypatch, run, "--hidden-size", "64").split() == narrow.split()


def test_ep_whatif_cells_are_one_labelled_number(capsys, monkeypatch):
    text = _analyze_text(capsys, monkeypatch, ROOT / "examples" / "router_trace", "--json")  # per-iteration
    result = json.loads(text)
    from megatron_moe_probe.commands.analyze_output import _whatif

    table = _whatif(result, False)[0]
    cells = [c for column in table.columns[3:] for c in column._cells]
    assert cells and all(re.fullmatch(r"-|\d+\.\d{3}", c) for c in cells), cells  # no [ ] or ( ) to decode
    labels = [c for c in table.columns[2]._cells if c]
    assert "its worst iteration" in labels and "the summed window" in labels


def test_compare_of_two_demo_runs_fits_80_columns():
    from megatron_moe_probe.commands.compare import print_table

    rows = json.loads((ROOT / "docs/results/cpu-ep-scan/compare.json").read_text())["rows"][:2]
    for row, name in zip(rows, ("runs/demo-20261206-033012", "runs/demo-20261206-033514")):
        row.update(run=name, ran=row["dispatcher"], status="ok")
    console = Console(width=80, file=io.StringIO(), record=True)
    print_table(rows, console=console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert text.count("demo-20261206-033012") == 1  # one table: nothing split off
    assert "gini" in text and "ran" not in text.split() and "status" not in text


def test_compare_plot_legend_names_the_differing_key_and_shows_identical_lines(figures, tmp_path):
    from megatron_moe_probe.commands.compare import plot_runs

    rows = json.loads((ROOT / "docs/results/cpu-ep-scan/compare.json").read_text())["rows"]
    pair = [r for r in rows if r["ep"] == 2 and r["dispatcher"] == "alltoall"]  # text and mock
    same = [r for r in rows if r["ep"] == 2 and r["data"] == "text"]  # alltoall and allgather: one line
    assert same[0]["max_over_mean_per_layer"] == same[1]["max_over_mean_per_layer"]
    plot_runs(pair, tmp_path / "a.png")
    labels = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert any("data=text" in t for t in labels) and any("data=mock" in t for t in labels)
    plot_runs(same, tmp_path / "b.png")
    lines = figures[-1].axes[0].get_lines()
    assert list(lines[0].get_xdata()) != list(lines[1].get_xdata())  # drawn side by side, not on top
    assert lines[0].get_marker() != lines[1].get_marker()
    assert "side by side" in figures[-1].axes[0].get_title()


def test_ratio_bars_start_at_balance(figures, tmp_path, capsys, monkeypatch):
    from megatron_moe_probe.commands.matrix import plot_matrix

    _analyze_text(capsys, monkeypatch, RUN, "--plot", tmp_path / "a.png")
    placement = figures[-1].axes[1]
    assert placement.get_ylim()[0] == 1.0 and "1.0 = balanced" in placement.get_title()
    heights = [b.get_height() + b.get_y() for b in placement.patches]
    assert heights and all(h >= 1.0 for h in heights)
    rows = json.loads((ROOT / "docs/results/cpu-ep-scan/compare.json").read_text())["rows"]
    plot_matrix(rows, tmp_path / "m.png")
    by_title = {ax.get_title(): ax for ax in figures[-1].axes}
    ratio = [ax for title, ax in by_title.items() if "max/mean" in title or "skew" in title]
    assert ratio and all(ax.get_ylim()[0] == 1.0 for ax in ratio)


def test_readme_shows_the_pretrain_gpt_diff_and_the_runner_line():
    text = (ROOT / "README.md").read_text()
    diff = re.search(r"```diff\n(.*?)```", text, re.S).group(1)
    added = [line.strip() for line in diff.splitlines() if line.strip().startswith("+")]
    assert "+from megatron_moe_probe.megatron import training as moe_probe" in added
    assert any("moe_probe.install()" in a for a in added) and any("moe_probe.chain_args(" in a for a in added)
    assert "torchrun" in text and "-m megatron_moe_probe.megatron.training pretrain_gpt.py" in text
    from megatron_moe_probe.megatron import training

    assert callable(training.run_script) and callable(training.chain_args) and callable(training.install)


def test_license_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # the table form warns on every install
    requires = project["build-system"]["requires"]
    assert any(r.startswith("setuptools>=77") for r in requires)  # PEP 639 strings need it
