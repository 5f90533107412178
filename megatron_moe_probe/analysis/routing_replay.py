"""Routing to replay through the real dispatchers (`moe-probe bench-dispatch`): pure torch.

A scenario is one dispatch: global per-expert assignment counts over the whole EP group
(`tokens_per_rank * ep` tokens, each routed to `topk` distinct experts). Three kinds:

- recorded: one (record, layer) of a run folder or a Megatron dump (RouterTracer / tokens per
  expert dumps are read one iteration per record, so their counts are per iteration). When the
  record holds exactly one dispatch's assignments (`tokens_per_rank * ep * topk`) its counts are
  replayed as they are; otherwise (a record summing several iterations or micro-batches, or a
  --tokens override) they are scaled to one dispatch by largest remainder, and the scenario says so.
- balanced: every expert gets the same count (+-1).
- worst: NeuSim's worst case, every token routed to the experts of one EP rank (the hottest
  recorded rank's, ceil(E/EP) experts; when top-k exceeds them, the rest spread evenly).

`routing_map` builds a [tokens, experts] boolean map whose column sums are exactly the counts
and whose rows each hold exactly top-k experts (lay the assignments out expert by expert and
deal position p to token p mod T: a run of at most T consecutive positions hits T distinct
tokens), then shuffles the tokens with a seeded generator so each EP rank's slice is a sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_moe_probe.errors import UsageError


@dataclass(frozen=True)
class Scenario:
    name: str                 # "recorded", "balanced", "worst"
    label: str                # e.g. "step 10 layer 2"
    counts: list[int]         # global per-expert assignments of one dispatch
    recorded: list[int] | None = None  # the record's own counts, when recorded
    exact: bool = True        # counts == recorded (no scaling)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "counts": self.counts, "recorded": self.recorded,
                "exact": self.exact, "notes": self.notes}


@dataclass(frozen=True)
class Geometry:
    num_experts: int
    ep: int
    topk: int
    hidden_size: int
    tokens_per_rank: int
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where it came from


def scale_counts(counts: list[int], total: int, cap: int) -> list[int]:
    """Counts proportional to `counts` summing to `total`, none above `cap` (largest remainder)."""
    n = len(counts)
    if total > n * cap:
        raise UsageError(f"{total} assignments cannot fit {n} experts of at most {cap} tokens each")
    weights = [float(c) for c in counts] if sum(counts) > 0 else [1.0] * n
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        left = total - sum(fixed.values())
        wsum = sum(weights[i] for i in free)
        if wsum <= 0:
            weights = [1.0 if i in free else w for i, w in enumerate(weights)]
            wsum = float(len(free))
        over = [i for i in free if left * weights[i] / wsum > cap]
        if not over:
            break
        for i in over:
            fixed[i] = cap
    ideal = {i: left * weights[i] / wsum for i in free}
    out = {i: int(math.floor(v)) for i, v in ideal.items()}
    rest = left - sum(out.values())
    for i in sorted(free, key=lambda i: (-(ideal[i] - out[i]), i))[:rest]:
        out[i] += 1
    out.update(fixed)
    return [out[i] for i in range(n)]


def balanced_counts(num_experts: int, tokens: int, topk: int) -> list[int]:
    return scale_counts([1] * num_experts, tokens * topk, tokens)


def worst_counts(num_experts: int, ep: int, tokens: int, topk: int, hot_rank: int = 0) -> list[int]:
    """Every token to the experts of EP rank `hot_rank` (Megatron places experts contiguously:
    rank r holds experts r*E/EP .. (r+1)*E/EP - 1); what top-k leaves over spreads evenly."""
    per_rank = num_experts // ep
    hot = range(hot_rank * per_rank, (hot_rank + 1) * per_rank)
    weights = [1 if e in hot else 0 for e in range(num_experts)]
    on_hot = min(topk, per_rank) * tokens
    counts = scale_counts(weights, on_hot, tokens)
    if topk > per_rank:
        others = scale_counts([0 if w else 1 for w in weights], (topk - per_rank) * tokens, tokens)
        counts = [a + b for a, b in zip(counts, others)]
    return counts


def routing_map(counts: list[int], tokens: int, topk: int, seed: int = 0) -> torch.Tensor:
    """[tokens, experts] bool: column sums == counts, every row exactly `topk` True."""
    if sum(counts) != tokens * topk:
        raise UsageError(f"counts sum to {sum(counts)}, not tokens x top-k = {tokens * topk}")
    if counts and max(counts) > tokens:
        raise UsageError(f"an expert count ({max(counts)}) exceeds the {tokens} tokens")
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    token_of = torch.arange(tokens * topk) % tokens
    rmap = torch.zeros(tokens, len(counts), dtype=torch.bool)
    rmap[token_of, experts] = True
    perm = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))
    return rmap[perm]


def routing_probs(rmap: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Positive float32 probabilities on the routed entries (normalised over each token's top-k),
    zero elsewhere: the [tokens, experts] `probs` the router hands the dispatcher."""
    g = torch.Generator().manual_seed(seed + 1)
    raw = torch.rand(rmap.shape, generator=g) + 0.1
    raw = raw * rmap
    return (raw / raw.sum(-1, keepdim=True).clamp_min(1e-12)).float()


def rank_slices(tokens_per_rank: int, ep: int) -> list[slice]:
    return [slice(r * tokens_per_rank, (r + 1) * tokens_per_rank) for r in range(ep)]


def traffic_rows(rmap: torch.Tensor, ep: int) -> dict[str, list[int]]:
    """Rows each EP rank sends to / receives from other ranks in one dispatch, per kind of
    dispatcher: per (token, expert) copy (alltoall), per (token, destination rank) (DeepEP /
    HybridEP dedupe a token going to several experts of one rank), and allgather (every rank
    receives every other rank's tokens)."""
    tokens, experts = rmap.shape
    per_rank_tokens, per_rank_experts = tokens // ep, experts // ep
    src = torch.arange(tokens) // per_rank_tokens
    by_rank = rmap.view(tokens, ep, per_rank_experts)
    copies = by_rank.sum(-1)  # [tokens, ep]: assignments to each destination rank
    sent_a2a, recv_a2a, sent_flex, recv_flex = [], [], [], []
    for r in range(ep):
        mine, other = src == r, torch.arange(ep) != r
        sent_a2a.append(int(copies[mine][:, other].sum()))
        recv_a2a.append(int(copies[~mine][:, r].sum()))
        sent_flex.append(int((copies[mine][:, other] > 0).sum()))
        recv_flex.append(int((copies[~mine][:, r] > 0).sum()))
    gathered = [per_rank_tokens * (ep - 1)] * ep
    return {"alltoall_sent": sent_a2a, "alltoall_received": recv_a2a, "flex_sent": sent_flex,
            "flex_received": recv_flex, "allgather_sent": [per_rank_tokens] * ep, "allgather_received": gathered}


# ---------------------------------------------------------------------------- from a run


def load_source(path: str | Path, layers: list[int] | None = None):
    """A RunWindow over a run folder or a Megatron dump (dumps one iteration per record)."""
    from megatron_moe_probe.analysis.runs import RunWindow, load_window
    from megatron_moe_probe import megatron_dumps

    path = Path(path)
    if not path.exists():
        raise UsageError(f"no such run folder or dump: {path}")
    if not path.is_dir():
        raise UsageError(f"not a run folder or dump folder: {path}")
    if megatron_dumps.detect(path):
        meta, reports = megatron_dumps.load_dump(path, megatron_dumps.ImportOptions(interval=1))
        if not reports:
            raise UsageError(f"{path}: the dump holds no routing")
        chosen = list(reports[0].layers) if layers is None else layers
        missing = [n for n in chosen if n not in reports[0].layers]
        if missing:
            raise UsageError(f"{path}: no layer {', '.join(map(str, missing))}")
        return RunWindow(path, meta, reports, chosen, reports[0].num_experts, reports[0].ep_size)
    return load_window(path, None, layers)


def geometry(window, *, ep: int | None = None, hidden_size: int | None = None, topk: int | None = None,
             tokens_per_rank: int | None = None) -> Geometry:
    """The run's geometry, each setting overridable: experts and EP from the records, top-k and
    hidden size from the run's metadata, tokens per rank per dispatch = micro-batch x sequence
    length / TP (else the last record's assignments / (top-k x EP x iterations))."""
    sources: dict[str, str] = {}

    def pick(name, given, default=None):
        if given is not None:
            sources[name] = "flag"
            return given
        found = window.setting(name) if name in ("hidden_size", "topk") else None
        if found is not None:
            sources[name] = found[1]
            return found[0]
        if default is not None:
            sources[name] = "default"
            return default
        raise UsageError(f"{window.path}: the run does not record its {name.replace('_', ' ')}; "
                         f"pass --{name.replace('_', '-')}")

    E = window.num_experts
    ep_ = ep if ep is not None else window.ep_size
    sources["ep"] = "flag" if ep is not None else "run records"
    k = pick("topk", topk)
    h = pick("hidden_size", hidden_size, default=1024)
    if tokens_per_rank is not None:
        t, sources["tokens_per_rank"] = tokens_per_rank, "flag"
    else:
        mbs, seq, tp = (window.setting(n) for n in ("micro_batch_size", "seq_length", "tensor_parallel"))
        if mbs and seq:
            t = mbs[0] * seq[0] // (tp[0] if tp else 1)
            sources["tokens_per_rank"] = f"micro batch x sequence / TP ({mbs[1]}, {seq[1]})"
        else:
            last = window.reports[-1]
            total = sum(last.tokens_per_expert[last.layers.index(window.layers[0])])
            t = max(1, total // (k * ep_ * max(1, last.steps)))
            sources["tokens_per_rank"] = "last record's assignments / (top-k x EP x iterations)"
    for name, value in (("EP", ep_), ("top-k", k), ("hidden size", h), ("tokens per rank", t)):
        if value < 1:
            raise UsageError(f"{name} must be positive, got {value}")
    if E % ep_:
        raise UsageError(f"{E} experts do not split over EP {ep_}")
    if k > E:
        raise UsageError(f"top-k {k} exceeds the {E} experts")
    return Geometry(E, ep_, k, h, t, sources)


def scenarios(window, geo: Geometry, max_recorded: int = 8) -> list[Scenario]:
    """The last `max_recorded` (record, layer) dispatches of the window, then balanced and worst."""
    tokens = geo.tokens_per_rank * geo.ep
    total = tokens * geo.topk
    recorded: list[Scenario] = []
    for report in window.reports:
        for layer in window.layers:
            counts = [int(c) for c in report.tokens_per_expert[report.layers.index(layer)]]
            if len(counts) != geo.num_experts:
                raise UsageError(f"{window.path}: step {report.step} layer {layer} has {len(counts)} experts, "
                                 f"expected {geo.num_experts}")
            if sum(counts) == 0:
                continue
            notes = []
            exact = sum(counts) == total and max(counts) <= tokens
            replay = counts if exact else scale_counts(counts, total, tokens)
            if not exact:
                notes.append(f"scaled from {sum(counts)} recorded assignments ({report.steps} iteration(s)) "
                             f"to one dispatch of {total}")
            label = f"step {report.step} layer {layer}"
            recorded.append(Scenario("recorded", label, replay, counts, exact, notes))
    if not recorded:
        raise UsageError(f"{window.path}: no recorded routing in the chosen layers")
    recorded = recorded[-max_recorded:]
    # The hottest recorded EP rank: the one whose experts received the most, summed over scenarios.
    per = geo.num_experts // geo.ep
    load = [sum(sum(s.counts[r * per:(r + 1) * per]) for s in recorded) for r in range(geo.ep)]
    hot = max(range(geo.ep), key=lambda r: load[r])
    return recorded + [
        Scenario("balanced", "balanced", balanced_counts(geo.num_experts, tokens, geo.topk)),
        Scenario("worst", f"all tokens to EP rank {hot}'s experts",
                 worst_counts(geo.num_experts, geo.ep, tokens, geo.topk, hot)),
    ]


# ---------------------------------------------------------------------------- results


def assemble(per_rank: list[dict], scenario_list: list[dict], geo: Geometry, bytes_per_element: int,
             seed: int = 0) -> dict:
    """Every rank's bench_rank output -> one row per (scenario, dispatcher): the counts the
    dispatcher itself reported (all ranks' local experts, in order) against the scenario's,
    the worst output error, and (when timed) the slowest rank's median times, the busiest
    rank's bytes received and the bandwidth that achieves."""
    ep = len(per_rank)
    per_rank = sorted(per_rank, key=lambda r: r["rank"])
    limits = {}
    for r in per_rank:
        for name, line in r["limits"].items():
            limits.setdefault(name, line)
    rows = []
    by_key: dict = {}
    for r in per_rank:
        for row in r["results"]:
            by_key.setdefault((row["scenario"], row["dispatcher"]), []).append(row)
    for (i, name), parts in sorted(by_key.items()):
        sc = scenario_list[i]
        rmap = routing_map(sc["counts"], geo.tokens_per_rank * ep, geo.topk, seed=seed + i)  # as bench_rank built it
        kind = "alltoall" if name == "alltoall" else "allgather" if name == "allgather" else "flex"
        traffic = traffic_rows(rmap, ep)
        errors = [p["error"] for p in parts if "error" in p]
        out = {"scenario": i, "name": sc["name"], "label": sc["label"], "dispatcher": name}
        if errors:
            out["error"] = errors[0]
            rows.append(out)
            continue
        seen = [c for p in parts for c in p["tokens_per_local_expert"]]
        out["counts_match"] = seen == list(sc["counts"])
        out["max_abs_error"] = max(p["max_abs_error"] for p in parts)
        recv = max(traffic[f"{kind}_received"])
        out["rows_received_max"] = recv
        out["bytes_received_max"] = recv * geo.hidden_size * bytes_per_element
        if all("ms" in p for p in parts):
            ms = {k: max(p["ms"][k] for p in parts) for k in parts[0]["ms"]}
            out["ms"] = ms
            for phase in ("dispatch", "combine"):
                t = ms[f"{phase}_ms"]
                out[f"{phase}_gb_s"] = out["bytes_received_max"] / (t * 1e-3) / 1e9 if t > 0 else None
        rows.append(out)
    a2a_vs_ag = [max(vals) for vals in zip(*[r["alltoall_vs_allgather"] for r in per_rank])] \
        if all("alltoall_vs_allgather" in r for r in per_rank) else []
    return {"ep": ep, "timed": all(r["timed"] for r in per_rank), "device": per_rank[0]["device"],
            "dtype": per_rank[0]["dtype"], "limits": limits, "rows": rows, "alltoall_vs_allgather": a2a_vs_ag}
