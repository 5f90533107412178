"""Tables (rich) and the plot (matplotlib) of `moe-probe analyze`'s result."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from megatron_moe_probe.commands import save_figure
from megatron_moe_probe.analysis.placement import STRATEGIES
from megatron_moe_probe.values import format_or_dash as _fmt
from megatron_moe_probe.values import nan_median
from megatron_moe_probe.writers.console import pack_columns, print_integrity


def _table(title: str, headers: list[str], caption: str | None = None, left: int = 1) -> Table:
    # One space between columns, headers wrapped at their spaces: the tables fit 80 columns
    # (_fit_width splits one that cannot, rather than break a word).
    table = Table(title=title, caption=caption, caption_justify="left", title_justify="left",
                  box=box.SIMPLE_HEAD, padding=0, pad_edge=False,
                  min_width=min(len(title) + 2, 80))  # the title on one line, within 80 columns
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left else "right", overflow="fold")
    return table


def _cell_width(cell) -> int:
    return Text.from_markup(cell).cell_len if isinstance(cell, str) else Text(str(cell)).cell_len


def _fit_width(table: Table, width: int) -> list[Table]:
    """The table with every column at least as wide as its longest header word and its widest
    cell, so that rich wraps headers at spaces only and never folds a word or a number; a table
    that cannot fit `width` that way is split into parts that repeat the first column (the title
    on the first part). The caption follows as text, wrapped at `width`, not at the table's."""
    columns = table.columns
    caption, table.caption = table.caption, None
    tail = [caption] if caption else []
    need = []
    for column in columns:
        words = [w for line in str(column.header).splitlines() for w in line.split()] or [""]
        need.append(max([len(w) for w in words] + [_cell_width(c) for c in column._cells]))
    for column, n in zip(columns, need):
        column.min_width = n
    edges = 2  # SIMPLE_HEAD draws an (empty) left and right edge
    if sum(need) + len(need) - 1 + edges <= width or len(columns) < 3:
        return [table, *tail]
    # The leading left-justified columns name the row (layer, EP and matrix...): every part repeats them.
    keys = 1
    while keys < len(columns) - 1 and columns[keys].justify == "left":
        keys += 1
    key_width = sum(need[:keys]) + keys - 1 + edges
    chunks = pack_columns([1 + n for n in need[keys:]], key_width, width, first=keys)
    parts = []
    for k, chunk in enumerate(chunks):
        part = Table(title=table.title if k == 0 else None, title_justify="left", box=box.SIMPLE_HEAD,
                     padding=0, pad_edge=False)
        shown = [*range(keys), *chunk]
        for j in shown:
            c = columns[j]
            part.add_column(c.header, justify=c.justify, overflow="fold", min_width=need[j])
        for r in range(table.row_count):
            part.add_row(*(columns[j]._cells[r] for j in shown))
        parts.append(part)
    return [*parts, *tail]


def print_result(result: dict, show_mapping: bool = False, console: Console | None = None) -> None:
    console = console or Console()  # the terminal's width (80 in a log); tables wrap their headers
    run = result["run"]
    console.print(f"[bold]{run['path']}[/bold]: {run['num_experts']} experts, EP={run['ep_size']}, "
                  f"layers {', '.join(map(str, run['layers']))}, iterations {run['first_step']}-{run['last_step']} "
                  f"({run['intervals']} intervals)")
    print_integrity(console, run.get("integrity"))
    for section in (_whatif, _matrix_check, _bands, _placement, _replication, _cost, _domains, _cross_domain, _drift,
                    _against, _sweep):
        for item in section(result, show_mapping):
            for part in _fit_width(item, console.width) if isinstance(item, Table) else [item]:
                console.print(part)


def _whatif(result: dict, _) -> list:
    data, run = result["ep_whatif"], result["run"]
    headers = ["layer", "expert max/mean", "busiest rank / mean rank over"] + [
        f"EP={s['ep']}" + (" (run)" if s["ep"] == run["ep_size"] else "") for s in data["by_ep"]]
    per_it = data.get("per_iteration")
    measures = [("window", "the summed window"), ("worst_interval", "its worst interval")]
    if per_it:
        measures = [("iteration_mean", "each iteration, mean"), ("worst_iteration", "its worst iteration")] + measures
    table = _table("EP what-if: busiest rank / mean rank, contiguous placement", headers,
                   "routing taken as independent of EP" + ("" if per_it else "; no per-iteration records"), left=1)
    table.columns[2].justify = "left"
    for i, layer in enumerate(run["layers"]):
        for m, (key, label) in enumerate(measures):
            table.add_row(str(layer) if m == 0 else "", _fmt(data["per_expert_max_over_mean"][i]) if m == 0 else "",
                          label, *[_fmt(s[key][i]) if s.get(key) is not None else "-" for s in data["by_ep"]])
    return [table]


def _matrix_check(result: dict, _) -> list:
    data = result["matrix_check"]
    if "skipped" in data:
        return [f"Rank-to-rank matrix check skipped: {data['skipped']}"]
    table = _table(f"Rank-to-rank matrix at EP={data['ep']}: measured vs modelled (tokens from all ranks alike)",
                   ["layer", "max cell error", "local measured", "local modelled", "sender skew",
                    "recv skew measured", "recv skew modelled"],
                   "receiver skew = max/mean of tokens received from other ranks; modelled sender skew is 1")
    for layer, row in zip(result["run"]["layers"], data["layers"]):
        table.add_row(str(layer), _fmt(row["max_cell_rel_error"], ".2%"), _fmt(row["local_fraction_measured"], ".1%"),
                      _fmt(row["local_fraction_modelled"], ".1%"), _fmt(row["sender_skew_measured"]),
                      _fmt(row["receiver_skew_from_others_measured"]), _fmt(row["receiver_skew_from_others_modelled"]))
    return [table]


def _bands(result: dict, _) -> list:
    data = result["bands"]
    thresholds = data["thresholds"]
    basis = "mean per iteration" if data["basis"] == "step" else "summed over the window"
    table = _table("Imbalance bands", ["layer", "max/mean", "Gini", "band"],
                   f"per-expert statistics, {basis}; high = max/mean >= {thresholds['max_over_mean']:g} and "
                   f"Gini >= {thresholds['gini']:g} (our thresholds, --band-thresholds)")
    for layer, row in zip(result["run"]["layers"], data["layers"]):
        table.add_row(str(layer), _fmt(row["max_over_mean"]), _fmt(row["gini"]), row["band"])
    run = data["run"]
    table.add_row("run (median)", _fmt(run["max_over_mean"]), _fmt(run["gini"]), f"[bold]{run['band']}[/bold]")
    return [table]


def _placement(result: dict, show_mapping: bool) -> list:
    data = result["placement"]
    windows = ["fit"] + (["test"] if data["test_window"] else [])
    if data["layers"] and data["layers"][0]["contiguous"].get("test_iteration_mean") is not None:
        windows.append("test_iteration_mean")
    labels = {"fit": "fit window", "test": "test window", "test_iteration_mean": "test, per iteration"}
    caption = (f"fitted on {data['fit_window']}" + (f", tested on {data['test_window']}" if data["test_window"]
               else " (one interval: nothing to test on)") +
               f"; replicated = {data['replicated']} hottest experts twice, "
               f"+{data['extra_slots_per_rank']} expert slot(s) per rank"
               + ("; test, per iteration = mean over the test window's iterations of each iteration's own value"
                  if "test_iteration_mean" in windows else ""))
    table = _table(f"Expert placement at EP={data['ep']}: busiest rank / mean rank",
                   ["layer", "window", *STRATEGIES], caption, left=2)
    lines = []
    for layer, row in zip(result["run"]["layers"], data["layers"]):
        for k, w in enumerate(windows):
            table.add_row(str(layer) if k == 0 else "", labels[w], *[_fmt(row[name][w]) for name in STRATEGIES])
        if show_mapping:
            for name in STRATEGIES:
                ranks = " | ".join(",".join(map(str, experts)) for experts in row[name]["mapping"])
                lines.append(f"layer {layer} {name}: {ranks}")
    return [table, *lines]


def _replication(result: dict, _) -> list:
    data = result.get("replication")
    if not data:
        return []
    table = _table(f"Per-iteration replication of hot experts at EP={data['ep']} (MoonEP/UltraEP model): maxvio",
                   ["layer", "static", "replicated", "weights moved/iter"],
                   f"maxvio = busiest rank / mean rank - 1; {data['slots_per_rank']} replica slot(s) per rank; "
                   f"{data['basis']}")
    for layer, row in zip(result["run"]["layers"], data["layers"]):
        table.add_row(str(layer), _fmt(row["maxvio_static"]), _fmt(row["maxvio_replicated"]),
                      _fmt(row["weights_moved_per_iteration"]))
    return [table]


def _cost(result: dict, _) -> list:
    data = result["cost"]
    if "skipped" in data:
        return [f"All-to-all cost model skipped: {data['skipped']}"]
    fabric, settings = data["fabric"], data["settings"]
    inputs = "; ".join(f"{name} {s['value']} ({s['source']})" for name, s in settings.items() if name != "missing")
    caption = (f"{inputs}; {fabric['intra_node_gb_s']:g} GB/s in a node, {fabric['inter_node_gb_s']:g} GB/s "
               f"between nodes, {fabric['latency_us']:g} us latency. Combine takes the same time. "
               "NeuSim: one hot expert at the layer's max/mean, ceil(E/EP) experts on the worst device")
    per_it = data.get("per_iteration")
    headers = ["EP", "matrix", "nodes", "MB in/rank balanced", "balanced us", "skewed us (worst layer)",
               "penalty worst (layer)", "penalty median", "NeuSim skew median"]
    if per_it:
        headers += ["penalty/iter median", "worst iteration"]
        caption += ("; penalty/iter = each iteration's own dispatch (its worst device), mean over iterations, "
                    "median over layers; worst iteration over all layers")
    table = _table("All-to-all dispatch per call: balanced vs recorded routing", headers, caption, left=2)
    layers = result["run"]["layers"]
    for entry in data["by_ep"]:
        rows = entry["layers"]
        worst = max(range(len(rows)), key=lambda i: rows[i]["penalty"])
        table.add_row(str(entry["ep"]), entry["source"], str(entry["nodes"]),
                      _fmt(rows[0]["balanced_bytes_received"] / 1e6, ".2f"), _fmt(rows[0]["balanced_us"], ".1f"),
                      _fmt(rows[worst]["skewed_us"], ".1f"), f"{_fmt(rows[worst]['penalty'])} ({layers[worst]})",
                      _fmt(nan_median([r["penalty"] for r in rows])), _fmt(nan_median([r["neusim_skew"] for r in rows])),
                      *([_fmt(nan_median([r.get("penalty_iteration_mean", float("nan")) for r in rows])),
                         _fmt(max((r.get("penalty_worst_iteration", float("nan")) for r in rows), default=float("nan")))]
                        if per_it else []))
    return [table]


def _domains(result: dict, _) -> list:
    data = result.get("domains")
    if not data:
        return []
    names = data["names"]
    share = _table("Domains: share of assignments and routing Gini per layer",
                   ["domain", "share"] + [f"Gini L{n}" for n in result["run"]["layers"]],
                   "counts split by the dataset each sample came from (the blend's datasets)")
    for d, name in enumerate(names):
        share.add_row(name, _fmt(data["share"][d], ".1%"), *[_fmt(g) for g in data["gini"][d]])
    div = _table("Jensen-Shannon divergence of expert popularity between domains (median over layers)",
                 ["domain"] + names, "log base 2: 0 = same popularity, 1 = disjoint experts")
    for a, name in enumerate(names):
        div.add_row(name, *[_fmt(v) for v in data["divergence_median"][a]])
    return [share, div]


def _cross_domain(result: dict, _) -> list:
    data = (result.get("domains") or {}).get("cross_domain_placement")
    if not data:
        return []
    names = [row["test"] for row in data["table"][0]]
    table = _table(f"Placement fitted on one domain, tested on each (EP={data['ep']}): contiguous / fitted "
                   "busiest-rank load, median over layers", ["fit \\ test"] + names,
                   f"> 1: the fitted placement beats contiguous on that domain; diagonal = in-domain. "
                   f"Median gain in-domain {_fmt(data['in_domain_gain_median'])}, "
                   f"cross-domain {_fmt(data['cross_domain_gain_median'])}")
    for row in data["table"]:
        table.add_row(row[0]["fit"], *[_fmt(cell["gain_median"]) for cell in row])
    return [table]


def _drift(result: dict, _) -> list:
    data = result.get("drift")
    if not data or len(data["windows"]) < 2:
        return []
    layers = result["run"]["layers"]
    table = _table("Drift: Jensen-Shannon divergence of expert popularity from the first window (from the previous)",
                   ["iterations"] + [f"layer {n}" for n in layers], "log base 2; windows of consecutive intervals")
    for w, span in enumerate(data["windows"]):
        table.add_row(span, *[f"{_fmt(a)} ({_fmt(b)})" for a, b in zip(data["from_first"][w], data["from_previous"][w])])
    return [table]


def _sweep(result: dict, _) -> list:
    data = result.get("sweep")
    if not data:
        return []
    table = _table("Batch-size sweep: routing imbalance by batch size (median over layers)",
                   ["run", "global batch", "micro batch", "assignments/iter/layer", "Gini/iter", "Gini window",
                    "max/mean/iter", "max/mean window", "rank max/mean/iter"],
                   "/iter = mean over iterations of each iteration's own value; window = on the summed counts")
    for r in data["runs"]:
        table.add_row(r["run"], _fmt(r["global_batch_size"], "d"), _fmt(r["micro_batch_size"], "d"),
                      _fmt(r["assignments_per_iteration"], ".0f"), _fmt(r["gini_step"]), _fmt(r["gini_window"]),
                      _fmt(r["max_over_mean_step"]), _fmt(r["max_over_mean_window"]), _fmt(r["rank_max_over_mean_step"]))
    return [table]


def _against(result: dict, _) -> list:
    data = result.get("against")
    if not data:
        return []
    stats = (("gini", "Gini"), ("max_over_mean", "max/mean"), ("entropy", "entropy"))
    headers = ["layer", "basis"] + [h for _, name in stats for h in (f"{name} A", f"{name} B", "A/B")]
    table = _table("Two runs compared: per-expert imbalance", headers,
                   f"A = {data['run']}, B = {data['against']}; step = mean over iterations of each iteration's "
                   "value, window = on counts summed over the window")
    for row in data["layers"]:
        for basis in ("step", "window"):
            table.add_row(str(row["layer"]), basis, *[_fmt(row[key][basis][k]) for key, _ in stats
                                                     for k in ("run", "against", "ratio")])
    ratio = data["median_ratio"]
    summary = (f"median over layers of A/B: Gini {_fmt(ratio['gini']['step'])} per iteration, "
               f"{_fmt(ratio['gini']['window'])} on the window; max/mean {_fmt(ratio['max_over_mean']['step'])}, "
               f"{_fmt(ratio['max_over_mean']['window'])}")
    return [table, summary, f"[bold]{data['direction']}[/bold] (A = {data['run']}, B = {data['against']})"]


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    panels = 3 if result.get("against") else 2
    fig = Figure(figsize=(5 * panels, 4), layout="constrained")
    axes = fig.subplots(1, panels)
    layers = result["run"]["layers"]

    scan = result["ep_whatif"]["by_ep"]
    eps = [s["ep"] for s in scan]
    for i, layer in enumerate(layers):
        axes[0].plot(eps, [s["window"][i] for s in scan], marker="o", label=f"layer {layer}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(eps, [str(ep) for ep in eps])
    axes[0].set(xlabel="EP", ylabel="busiest rank / mean", title="EP what-if (contiguous placement)")
    axes[0].legend(fontsize="small")

    # Bars start at 1.0 (perfect balance), not 0: the eye compares their heights, and from 0 a
    # 1.0 vs 1.3 difference is a few percent of the bar. Each bar is labelled with its value, so a
    # placement at 1.0 (a bar of no height) still shows. One colour per strategy, hatched on
    # the test window; the legend below the axes, never on a bar.
    data = result["placement"]
    windows = ["fit"] + (["test"] if data["test_window"] else [])
    width = 0.8 / (len(STRATEGIES) * len(windows))
    colours = dict(zip(STRATEGIES, ("tab:gray", "tab:blue", "tab:green")))
    top = 1.0
    for k, (w, name) in enumerate((w, name) for w in windows for name in STRATEGIES):
        values = [row[name][w] for row in data["layers"]]
        bars = axes[1].bar([i + k * width for i in range(len(layers))], [v - 1.0 for v in values], width, bottom=1.0,
                           color=colours[name], label=f"{name} ({w})", hatch="//" if w == "test" else None)
        axes[1].bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize="x-small", rotation=90, padding=2)
        top = max([top, *[v for v in values if v == v]])
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set_ylim(1.0, 1.0 + (top - 1.0) * 1.25 + 0.02)
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], [str(n) for n in layers])
    axes[1].set(xlabel="layer", ylabel="busiest rank / mean rank",
                title=f"expert placement at EP={data['ep']}\n(axis from 1.0 = balanced)")
    axes[1].legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18),
                   ncol=len(STRATEGIES), frameon=False)

    if panels == 3:
        against = result["against"]
        basis = against["basis"]
        for key, label in (("run", Path(against["run"]).name), ("against", Path(against["against"]).name)):
            axes[2].plot([r["layer"] for r in against["layers"]], [r["gini"][basis][key] for r in against["layers"]],
                         marker="o", label=label)
        axes[2].set_xticks(layers, [str(n) for n in layers])
        axes[2].set(xlabel="layer", ylabel=f"Gini ({basis})", title="routing Gini by run")
        axes[2].legend(fontsize="small")
    save_figure(fig, path)  # exactly `path`, whatever its name ends in


def plot_questions(result: dict, folder: Path) -> list[Path]:
    """One plot per question, for what the result holds: domains_heatmap, domain_divergence,
    cross_domain_placement, drift, batch_size, mock_vs_real (PNG)."""
    import math

    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    layers = result["run"]["layers"]

    def save(fig, name):
        path = folder / f"{name}.png"
        save_figure(fig, path)
        written.append(path)

    data = result.get("domains")
    if data:
        names = data["names"]
        fig = Figure(figsize=(10, 1.2 + 1.1 * len(layers) * max(1, len(names)) / 4), layout="constrained")
        axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
        for ax, li in zip(axes, range(len(layers))):
            grid = [[v if v is not None and not math.isnan(v) else 0.0 for v in data["popularity"][d][li]]
                    for d in range(len(names))]
            im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(len(names)), names)
            ax.set_title(f"layer {layers[li]}: share of the domain's assignments per expert", fontsize="small")
            fig.colorbar(im, ax=ax, fraction=0.02)
        axes[-1].set_xlabel("expert")
        save(fig, "domains_heatmap")

        fig = Figure(figsize=(5, 4), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(data["divergence_median"], cmap="magma", vmin=0)
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_yticks(range(len(names)), names)
        for a in range(len(names)):
            for b in range(len(names)):
                ax.text(b, a, f"{data['divergence_median'][a][b]:.3f}", ha="center", va="center", color="w",
                        fontsize="small")
        ax.set_title("Jensen-Shannon divergence between domains\n(median over layers)")
        fig.colorbar(im, ax=ax)
        save(fig, "domain_divergence")

        cross = data["cross_domain_placement"]
        grid = [[cell["gain_median"] for cell in row] for row in cross["table"]]
        fig = Figure(figsize=(5, 4), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(grid, cmap="RdYlGn", vmin=min(1.0, min(min(r) for r in grid)), vmax=max(max(r) for r in grid))
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_yticks(range(len(names)), names)
        for a in range(len(names)):
            for b in range(len(names)):
                ax.text(b, a, f"{grid[a][b]:.3f}", ha="center", va="center", fontsize="small")
        ax.set(xlabel="tested on", ylabel="fitted on",
               title=f"placement gain over contiguous, EP={cross['ep']}\n(contiguous / fitted busiest rank)")
        fig.colorbar(im, ax=ax)
        save(fig, "cross_domain_placement")

    drift = result.get("drift")
    if drift and len(drift["windows"]) > 1:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        for li, layer in enumerate(layers):
            ax.plot(range(len(drift["windows"])), [w[li] for w in drift["from_first"]], marker="o", label=f"layer {layer}")
        ax.set_xticks(range(len(drift["windows"])), drift["windows"], rotation=20)
        ax.set(xlabel="iterations", ylabel="JS divergence from the first window", title="expert popularity drift")
        ax.legend(fontsize="small")
        save(fig, "drift")

    sweep = result.get("sweep")
    if sweep:
        runs = sweep["runs"]
        x = [r["global_batch_size"] or r["micro_batch_size"] or i for i, r in enumerate(runs)]
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        ax.plot(x, [r["gini_step"] for r in runs], marker="o", label="Gini per iteration")
        ax.plot(x, [r["gini_window"] for r in runs], marker="s", label="Gini on window sums")
        ax.plot(x, [r["max_over_mean_step"] for r in runs], marker="^", label="max/mean per iteration")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="global batch size (sequences)", ylabel="median over layers", title="routing imbalance by batch size")
        ax.legend(fontsize="small")
        save(fig, "batch_size")

    against = result.get("against")
    if against:
        basis = against["basis"]
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        for key, label in (("run", "A " + Path(against["run"]).name), ("against", "B " + Path(against["against"]).name)):
            ax.plot([r["layer"] for r in against["layers"]], [r["gini"][basis][key] for r in against["layers"]],
                    marker="o", label=label)
        ax.set(xlabel="layer", ylabel=f"Gini ({'per iteration' if basis == 'step' else 'window'})",
               title=against["direction"])
        ax.legend(fontsize="small")
        save(fig, "mock_vs_real")
    return written
