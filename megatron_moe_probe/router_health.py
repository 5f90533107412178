"""Router health: device-side sums over the router's own outputs, and the statistics made from them.

Pure torch, no Megatron (`megatron/router_watch.py` calls `record` from a wrapper around each
router's `routing`). Definitions in docs/metrics.md ("Router health"). Per layer and interval:

- score entropy: mean over tokens of the entropy (nats) of the token's score distribution
  (softmax of the logits; sigmoid scores normalized to sum 1, as Megatron's aux loss does);
- top-k margin: mean over tokens of the k-th minus the (k+1)-th selection score (scores plus
  the expert bias, where Megatron keeps one: what its top-k compares);
- aux-load TV: total-variation distance between the load the auxiliary loss sees (the mean
  score per expert) and the load the router actually assigned (routing-map counts);
- expert bias per expert, averaged over the ranks that hold the layer, and its Pearson
  correlation with the assigned load;
- tokens per expert: min, p50, p90, p99, max, std, and maxvio = max / mean - 1.

The score statistics are sums over the router calls of sampled iterations (every N-th; a
statistic of the scores, not a count, so a sample estimates it); the tokens-per-expert
statistics come from the probe's exact interval counts. Every sum is a float64 or int64
device buffer added to in place (capture safe: fixed buffers, no host sync); the interval's
one all-reduce sums them over ranks.
"""

from __future__ import annotations

import math

import torch

PERCENTILES = (50, 90, 99)
# Per-layer statistic names (record per_layer columns; docs/metrics.md).
LAYER_STATS = ("score_entropy", "topk_margin", "aux_load_tv", "maxvio", "bias_load_corr",
               "tpe_min", "tpe_p50", "tpe_p90", "tpe_p99", "tpe_max", "tpe_std")
# Summarized across layers with the worst layer named (higher is worse for these).
ACROSS_LAYERS = ("maxvio", "aux_load_tv", "tpe_std")


def scores_of(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """[T, E] scores in [0, 1]: softmax, or sigmoid."""
    x = logits.float()
    return torch.sigmoid(x) if score_function == "sigmoid" else torch.softmax(x, dim=-1)


class RouterHealthAccumulator:
    """float64 [score_sum L×E, bias_sum L×E, entropy L, margin L, bias_ranks L] and
    int64 [load L×E, tokens L], one flat buffer each."""

    def __init__(self, num_slots: int, num_experts: int, device: torch.device):
        L, E = num_slots, num_experts
        self.num_slots, self.num_experts = L, E
        self.floats = torch.zeros(2 * L * E + 3 * L, dtype=torch.float64, device=device)
        self.ints = torch.zeros(L * E + L, dtype=torch.int64, device=device)
        self.f = self.unpack_floats(self.floats)
        self.i = self.unpack_ints(self.ints)

    def unpack_floats(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        L, E = self.num_slots, self.num_experts
        a, b, c, d, e = flat.split([L * E, L * E, L, L, L])
        return {"score_sum": a.view(L, E), "bias_sum": b.view(L, E), "entropy_sum": c,
                "margin_sum": d, "bias_ranks": e}

    def unpack_ints(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        L, E = self.num_slots, self.num_experts
        a, b = flat.split([L * E, L])
        return {"load": a.view(L, E), "tokens": b}

    def record(self, slot: int, logits: torch.Tensor, routing_map: torch.Tensor, *, topk: int,
               score_function: str, expert_bias: torch.Tensor | None = None) -> None:
        """One router call: logits [.., E] as the router's gating produced them, its final
        routing map [T, E] (after capacity dropping)."""
        E = self.num_experts
        scores = scores_of(logits.reshape(-1, E), score_function)
        dist = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20) if score_function == "sigmoid" else scores
        f = self.f
        f["score_sum"][slot] += dist.sum(0, dtype=torch.float64)
        f["entropy_sum"][slot] += torch.special.entr(dist).sum(dtype=torch.float64)
        if topk < E:
            selection = scores + expert_bias.float() if expert_bias is not None else scores
            top = selection.topk(topk + 1, dim=-1, sorted=True).values
            f["margin_sum"][slot] += (top[:, topk - 1] - top[:, topk]).sum(dtype=torch.float64)
        self.i["load"][slot] += routing_map.sum(0)
        self.i["tokens"][slot] += routing_map.shape[0]

    def add_bias(self, slot: int, expert_bias: torch.Tensor) -> None:
        """The layer's expert bias as it is now (read once per interval, before the reduction)."""
        self.f["bias_sum"][slot] += expert_bias.to(torch.float64)
        self.f["bias_ranks"][slot] += 1

    def reset(self) -> None:
        self.floats.zero_()
        self.ints.zero_()


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else math.nan


def count_stats(load: torch.Tensor) -> dict[str, float]:
    """Tokens-per-expert distribution of one layer [E]: min, percentiles, max, std, maxvio."""
    x = load.to(torch.float64)
    mean = float(x.mean())
    out = {"tpe_min": float(x.min()), "tpe_max": float(x.max()), "tpe_std": float(x.std(unbiased=False))}
    for p in PERCENTILES:  # linear interpolation between order statistics (numpy's default)
        out[f"tpe_p{p}"] = float(torch.quantile(x, p / 100))
    out["maxvio"] = float(x.max()) / mean - 1 if mean > 0 else math.nan
    return out


def summarize(floats: torch.Tensor, ints: torch.Tensor, acc: RouterHealthAccumulator,
              slots: list[int], counts: dict[int, torch.Tensor] | None = None) -> dict:
    """The reduced sums (CPU) -> {"layers": [1-based layer numbers], "per_layer": [{stat: value}
    per layer], "per_expert": {name: [[value per expert] per layer]}, "across_layers": {stat:
    {min, p50, p90, max, worst_layer}}} for the layers in `slots` (0-based)."""
    f, i = acc.unpack_floats(floats), acc.unpack_ints(ints)
    per_layer: dict[int, dict[str, float]] = {}
    aux_load, bias = [], []
    for slot in slots:
        tokens = int(i["tokens"][slot])
        load = i["load"][slot].to(torch.float64)
        exact = counts[slot].to(torch.float64) if counts and slot in counts else load
        row = {name: math.nan for name in LAYER_STATS}
        if float(exact.sum()):
            row.update(count_stats(exact))
        if tokens:
            row["score_entropy"] = float(f["entropy_sum"][slot]) / tokens
            row["topk_margin"] = float(f["margin_sum"][slot]) / tokens
            p_aux = f["score_sum"][slot] / float(f["score_sum"][slot].sum())
            p_act = load / float(load.sum()) if float(load.sum()) else torch.zeros_like(load)
            row["aux_load_tv"] = 0.5 * float((p_aux - p_act).abs().sum())
            aux_load.append(p_aux.tolist())
        else:
            aux_load.append([])
        ranks = float(f["bias_ranks"][slot])
        if ranks:
            b = f["bias_sum"][slot] / ranks
            bias.append(b.tolist())
            row["bias_load_corr"] = _pearson(b, exact)
        else:
            bias.append([])
        per_layer[slot + 1] = row
    across = {}
    for stat in ACROSS_LAYERS:
        values = {layer: row[stat] for layer, row in per_layer.items() if not math.isnan(row[stat])}
        if values:
            v = torch.tensor(list(values.values()), dtype=torch.float64)
            worst = max(values, key=values.get)
            across[stat] = {"min": float(v.min()), "p50": float(torch.quantile(v, 0.5)),
                            "p90": float(torch.quantile(v, 0.9)), "max": float(v.max()), "worst_layer": worst}
    per_expert = {"aux_load": aux_load}
    if any(bias):
        per_expert["expert_bias"] = bias
    return {"layers": list(per_layer), "per_layer": list(per_layer.values()), "per_expert": per_expert,
            "across_layers": across}
