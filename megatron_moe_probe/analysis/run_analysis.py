"""Every analysis of one run window, as plain data: what `moe-probe analyze` prints and
`--json` returns. `AnalysisOptions` holds what the command line may set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megatron_moe_probe import integrity_report
from megatron_moe_probe.analysis import a2a_cost, bands, domains, placement, whatif
from megatron_moe_probe.analysis.runs import RunWindow, layer_imbalance
from megatron_moe_probe.errors import UsageError

# Used when meta.json does not say; shown as "assumed" in the output.
ASSUMED_BYTES_PER_ELEMENT = 2  # bf16 activations, what Megatron MoE training dispatches
ASSUMED_GPUS_PER_NODE = 8
_NO_MATRIX = "the run records no rank matrix (a tokens_per_expert dump says what experts received, not from where)"


@dataclass(frozen=True)
class AnalysisOptions:
    """None means: from the run (meta.json, the records) or the documented default."""

    ep: list[int] | None = None  # EP degrees for the what-if and the cost model
    target_ep: int | None = None  # EP of the placement
    replicate: int | None = None  # hottest experts given a second copy
    band_thresholds: str | None = None  # "MAX/MEAN,GINI"
    hidden_size: int | None = None
    bytes_per_element: int | None = None
    tokens_per_rank: int | None = None
    gpus_per_node: int | None = None
    intra_node_gbs: float = a2a_cost.Fabric.intra_node_gb_s
    inter_node_gbs: float = a2a_cost.Fabric.inter_node_gb_s
    latency_us: float = a2a_cost.Fabric.latency_us
    drift_windows: int = 4  # consecutive windows the run is cut into for the drift section


def _setting(window: RunWindow, name: str, given: int | None) -> dict | None:
    if given is not None:
        return {"value": given, "source": "command line"}
    found = window.setting(name)
    return None if found is None else {"value": found[0], "source": found[1]}


def _tokens_per_rank(window: RunWindow, given: int | None) -> dict | None:
    if given is not None:
        return {"value": given, "source": "command line"}
    calls = (window.meta.get("imported") or {}).get("tokens_per_call")
    if calls:  # a RouterTracer dump says how many tokens each router call saw
        return {"value": int(calls), "source": "RouterTracer records' num_tokens"}
    mbs, seq = window.setting("micro_batch_size"), window.setting("seq_length")
    if mbs is None or seq is None:
        return None
    tp, cp = (window.setting(n) or (1, "assumed") for n in ("tensor_parallel", "context_parallel"))
    return {"value": mbs[0] * seq[0] // (tp[0] * cp[0]),
            "source": f"micro-batch {mbs[0]} x seq {seq[0]} / (TP {tp[0]} x CP {cp[0]}), from meta"}


def cost_settings(window: RunWindow, options: AnalysisOptions) -> dict:
    """Every input of the cost model with where it came from; `missing` names the ones that
    neither the command line nor meta.json gave."""
    settings = {
        "hidden_size": _setting(window, "hidden_size", options.hidden_size),
        "bytes_per_element": _setting(window, "bytes_per_element", options.bytes_per_element)
        or {"value": ASSUMED_BYTES_PER_ELEMENT, "source": "assumed (bf16)"},
        "tokens_per_rank": _tokens_per_rank(window, options.tokens_per_rank),
        "topk": _setting(window, "topk", None),
        "gpus_per_node": _setting(window, "gpus_per_node", options.gpus_per_node)
        or {"value": ASSUMED_GPUS_PER_NODE, "source": "assumed"},
    }
    for name in ("hidden_size", "bytes_per_element", "tokens_per_rank", "gpus_per_node"):
        if settings[name] is not None and settings[name]["value"] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {settings[name]['value']}")
    settings["missing"] = [name for name, s in settings.items() if s is None]
    return settings


def _cost_section(window: RunWindow, options: AnalysisOptions, eps: list[int], per_expert_mom: list[float]) -> dict:
    settings = cost_settings(window, options)
    fabric = a2a_cost.Fabric(options.intra_node_gbs, options.inter_node_gbs, options.latency_us,
                             settings["gpus_per_node"]["value"])
    section = {"settings": settings, "fabric": asdict(fabric), "by_ep": []}
    if settings["missing"]:
        flags = [f"--{n.replace('_', '-')}" for n in settings["missing"] if n != "topk"]
        section["skipped"] = (f"meta.json does not give {', '.join(settings['missing'])}"
                              + (f"; pass {', '.join(flags)}" if flags else ""))
        return section
    value = {name: s["value"] for name, s in settings.items() if name != "missing"}
    assignments = value["tokens_per_rank"] * value["topk"]
    per_assignment = value["hidden_size"] * value["bytes_per_element"]
    counts = window.tokens_per_expert().sum(0)
    per_iteration = window.iteration_counts()
    measured_iterations = window.iteration_rank_matrix()
    section["per_iteration"] = per_iteration is not None
    matrices = [(ep, "modelled", whatif.modelled_rank_matrix(counts, ep)) for ep in eps]
    if window.has_rank_matrix:
        matrices.append((window.ep_size, "measured", window.rank_matrix().sum(0)))
    for ep, source, matrix in sorted(matrices, key=lambda m: (m[0], m[1] != "measured")):
        layers = a2a_cost.dispatch_cost(matrix, assignments, per_assignment, fabric)
        # Each iteration's own dispatch (what a GPU waits for): its matrix, recorded at the run's
        # EP with --moe-probe-iterations matrix, else modelled from its per-expert counts.
        it_matrix = None
        if source == "measured" and measured_iterations is not None:
            it_matrix = measured_iterations
        elif source == "modelled" and per_iteration is not None:
            it_matrix = whatif.modelled_rank_matrix(per_iteration, ep)
        if it_matrix is not None and it_matrix.shape[0]:
            pen = a2a_cost.iteration_penalties(it_matrix, assignments, per_assignment, fabric)  # [S, L]
            for row, mean, worst in zip(layers, pen.mean(0).tolist(), pen.amax(0).tolist()):
                row["penalty_iteration_mean"], row["penalty_worst_iteration"] = mean, worst
        for row, mom in zip(layers, per_expert_mom):
            # NeuSim's form with f = this layer's per-expert max/mean and one hot expert
            # (max/mean <= E/K always holds; the clamp only absorbs rounding).
            f = min(mom, window.num_experts / value["topk"])
            row["neusim_skew"] = a2a_cost.worst_device_skew(window.num_experts, value["topk"], ep, f, 1)
        section["by_ep"].append({"ep": ep, "source": source,
                                 "nodes": math.ceil(ep / fabric.gpus_per_node), "layers": layers})
    return section


def analyze(window: RunWindow, options: AnalysisOptions = AnalysisOptions()) -> dict:
    """Every analysis of one run window as plain data (the --json output)."""
    eps = options.ep if options.ep is not None else whatif.ep_degrees(window.num_experts)
    if not eps:
        raise UsageError("--ep needs at least one EP degree")
    for ep in eps:
        whatif.check_ep(window.num_experts, ep)
    target = window.ep_size if options.target_ep is None else options.target_ep
    whatif.check_ep(window.num_experts, target)
    # Default: one extra expert slot per rank (none to replicate onto at EP=1).
    replicate = (target if target > 1 else 0) if options.replicate is None else options.replicate
    thresholds = bands.BandThresholds.parse(options.band_thresholds) if options.band_thresholds else bands.BandThresholds()
    counts = window.tokens_per_expert()
    per_iteration = window.iteration_counts()
    imbalance = layer_imbalance(window)
    basis = "step" if not any(math.isnan(v) for v in imbalance["gini"]["step"]) else "window"
    fit, test = window.halves()
    return {
        "run": {"path": str(window.path), "num_experts": window.num_experts, "ep_size": window.ep_size,
                "layers": window.layers, "first_step": window.first_step, "last_step": window.last_step,
                "intervals": len(window.reports), "tokens": counts.sum((0, 2)).tolist(),
                "integrity": integrity_report.run_summary(window.reports)},
        "ep_whatif": {"per_expert_max_over_mean": imbalance["max_over_mean"]["window"],
                      "per_iteration": per_iteration is not None,
                      "by_ep": whatif.ep_scan(counts, eps, per_iteration)},
        "matrix_check": {"ep": window.ep_size,
                         "layers": whatif.matrix_check(window.rank_matrix().sum(0), counts.sum(0))}
        if window.has_rank_matrix else {"ep": window.ep_size, "skipped": _NO_MATRIX},
        "modelled_matrix": {"ep": target, "layers": whatif.modelled_rank_matrix(counts.sum(0), target).tolist()},
        "bands": {"basis": basis, **bands.band_table(imbalance["max_over_mean"][basis], imbalance["gini"][basis],
                                                     thresholds)},
        "placement": {"ep": target, "replicated": replicate,
                      "extra_slots_per_rank": placement.extra_slots_per_rank(replicate, target),
                      "fit_window": fit.describe_steps(), "test_window": test and test.describe_steps(),
                      "layers": placement.compare_placements(fit.tokens_per_expert().sum(0),
                                                             test and test.tokens_per_expert().sum(0),
                                                             target, replicate,
                                                             test and test.iteration_counts())},
        "domains": domains.domain_section(window, target),
        "drift": domains.drift_section(window, options.drift_windows),
        "cost": _cost_section(window, options, eps, imbalance["max_over_mean"]["window"]),
    }
