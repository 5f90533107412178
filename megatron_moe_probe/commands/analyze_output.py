"""Tables (rich) and the plot (matplotlib) of `moe-probe analyze`'s result."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from megatron_moe_probe.analysis.placement import STRATEGIES
from megatron_moe_probe.values import format_or_dash as _fmt
from megatron_moe_probe.values import nan_median


def _table(title: str, headers: list[str], caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption, caption_justify="left", title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    return table


def print_result(result: dict, show_mapping: bool = False, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 120))
    run = result["run"]
    console.print(f"[bold]{run['path']}[/bold]: {run['num_experts']} experts, EP={run['ep_size']}, "
                  f"layers {', '.join(map(str, run['layers']))}, iterations {run['first_step']}-{run['last_step']} "
                  f"({run['intervals']} intervals)")
    for section in (_whatif, _matrix_check, _bands, _placement, _cost, _against):
        for item in section(result, show_mapping):
            console.print(item)


def _whatif(result: dict, _) -> list:
    data, run = result["ep_whatif"], result["run"]
    headers = ["layer", "expert max/mean"] + [f"EP={s['ep']}" + (" (run)" if s["ep"] == run["ep_size"] else "")
                                              for s in data["by_ep"]]
    table = _table("EP what-if: busiest rank / mean rank, contiguous placement", headers,
                   "summed over the window (worst single interval); routing taken as independent of EP")
    for i, layer in enumerate(run["layers"]):
        table.add_row(str(layer), _fmt(data["per_expert_max_over_mean"][i]),
                      *[f"{_fmt(s['window'][i])} ({_fmt(s['worst_interval'][i])})" for s in data["by_ep"]])
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
    headers = ["layer"] + [f"{name} {w}" for w in windows for name in STRATEGIES]
    caption = (f"fitted on {data['fit_window']}" + (f", tested on {data['test_window']}" if data["test_window"]
               else " (one interval: nothing to test on)") +
               f"; replicated = {data['replicated']} hottest experts twice, "
               f"+{data['extra_slots_per_rank']} expert slot(s) per rank")
    table = _table(f"Expert placement at EP={data['ep']}: busiest rank / mean rank", headers, caption)
    lines = []
    for layer, row in zip(result["run"]["layers"], data["layers"]):
        table.add_row(str(layer), *[_fmt(row[name][w]) for w in windows for name in STRATEGIES])
        if show_mapping:
            for name in STRATEGIES:
                ranks = " | ".join(",".join(map(str, experts)) for experts in row[name]["mapping"])
                lines.append(f"layer {layer} {name}: {ranks}")
    return [table, *lines]


def _cost(result: dict, _) -> list:
    data = result["cost"]
    if "skipped" in data:
        return [f"All-to-all cost model skipped: {data['skipped']}"]
    fabric, settings = data["fabric"], data["settings"]
    inputs = "; ".join(f"{name} {s['value']} ({s['source']})" for name, s in settings.items() if name != "missing")
    caption = (f"{inputs}; {fabric['intra_node_gb_s']:g} GB/s in a node, {fabric['inter_node_gb_s']:g} GB/s "
               f"between nodes, {fabric['latency_us']:g} us latency. Combine takes the same time. "
               "NeuSim: one hot expert at the layer's max/mean, ceil(E/EP) experts on the worst device")
    table = _table("All-to-all dispatch per call: balanced vs recorded routing", [
        "EP", "matrix", "nodes", "MB in/rank balanced", "balanced us", "skewed us (worst layer)",
        "penalty worst (layer)", "penalty median", "NeuSim skew median"], caption)
    layers = result["run"]["layers"]
    for entry in data["by_ep"]:
        rows = entry["layers"]
        worst = max(range(len(rows)), key=lambda i: rows[i]["penalty"])
        table.add_row(str(entry["ep"]), entry["source"], str(entry["nodes"]),
                      _fmt(rows[0]["balanced_bytes_received"] / 1e6, ".2f"), _fmt(rows[0]["balanced_us"], ".1f"),
                      _fmt(rows[worst]["skewed_us"], ".1f"), f"{_fmt(rows[worst]['penalty'])} ({layers[worst]})",
                      _fmt(nan_median([r["penalty"] for r in rows])), _fmt(nan_median([r["neusim_skew"] for r in rows])))
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
    return [table, summary]


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

    # Bars grow from 1.0 (perfect balance); one colour per strategy, hatched on the test window.
    data = result["placement"]
    windows = ["fit"] + (["test"] if data["test_window"] else [])
    width = 0.8 / (len(STRATEGIES) * len(windows))
    colours = dict(zip(STRATEGIES, ("tab:gray", "tab:blue", "tab:green")))
    for k, (w, name) in enumerate((w, name) for w in windows for name in STRATEGIES):
        axes[1].bar([i + k * width for i in range(len(layers))], [row[name][w] - 1 for row in data["layers"]], width,
                    bottom=1, color=colours[name], label=f"{name} ({w})", hatch="//" if w == "test" else None)
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], [str(n) for n in layers])
    axes[1].set(xlabel="layer", ylabel="busiest rank / mean", title=f"placement at EP={data['ep']}")
    axes[1].legend(fontsize="small")

    if panels == 3:
        against = result["against"]
        basis = against["basis"]
        for key, label in (("run", Path(against["run"]).name), ("against", Path(against["against"]).name)):
            axes[2].plot([r["layer"] for r in against["layers"]], [r["gini"][basis][key] for r in against["layers"]],
                         marker="o", label=label)
        axes[2].set_xticks(layers, [str(n) for n in layers])
        axes[2].set(xlabel="layer", ylabel=f"Gini ({basis})", title="routing Gini by run")
        axes[2].legend(fontsize="small")
    fig.savefig(path, dpi=110)
