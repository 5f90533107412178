"""Statistics against hand-computed values and an independent numpy implementation."""

import math

import numpy as np
import pytest
import torch

from megatron_moe_probe import stats


# ---- independent reference implementations (numpy, different formulas where possible) ----

def np_gini(x):
    x = np.asarray(x, dtype=float)
    if x.sum() == 0:
        return math.nan
    # Mean absolute difference over all ordered pairs / (2 * mean).
    return np.abs(x[:, None] - x[None, :]).mean() / (2 * x.mean())


def np_entropy(x):
    x = np.asarray(x, dtype=float)
    if x.sum() == 0:
        return math.nan
    p = x[x > 0] / x.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(x)))


def np_cv(x):
    x = np.asarray(x, dtype=float)
    return math.nan if x.sum() == 0 else float(np.std(x) / np.mean(x))


def np_max_over_mean(x):
    x = np.asarray(x, dtype=float)
    return math.nan if x.sum() == 0 else float(x.max() / x.mean())


def close(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


# ---- hand-computed values ----

def test_gini_by_hand():
    assert float(stats.gini(torch.tensor([0, 0, 0, 4]))) == pytest.approx(0.75)
    assert float(stats.gini(torch.tensor([5, 5, 5, 5]))) == pytest.approx(0.0)
    # [1, 3]: |1-3| summed over ordered pairs = 4, / (2 * n^2 * mean) = 4 / (2*4*2) = 0.25
    assert float(stats.gini(torch.tensor([1, 3]))) == pytest.approx(0.25)


def test_max_over_mean_cv_entropy_by_hand():
    x = torch.tensor([2, 4, 6, 8])  # mean 5, population std sqrt(5)
    assert float(stats.max_over_mean(x)) == pytest.approx(8 / 5)
    assert float(stats.min_over_mean(x)) == pytest.approx(2 / 5)
    assert float(stats.coefficient_of_variation(x)) == pytest.approx(math.sqrt(5) / 5)
    # all mass on one of four experts: entropy 0; uniform: 1; two of four equal: log 2 / log 4 = 0.5
    assert float(stats.normalized_entropy(torch.tensor([0, 0, 7, 0]))) == pytest.approx(0.0)
    assert float(stats.normalized_entropy(torch.tensor([3, 3, 3, 3]))) == pytest.approx(1.0)
    assert float(stats.normalized_entropy(torch.tensor([0, 5, 0, 5]))) == pytest.approx(0.5)


def test_all_tokens_on_one_expert():
    x = torch.tensor([0, 0, 0, 0, 0, 0, 0, 96])
    assert float(stats.max_over_mean(x)) == pytest.approx(8.0)  # = E
    assert float(stats.gini(x)) == pytest.approx(7 / 8)  # (n-1)/n
    assert int(stats.dead_count(x)) == 7
    assert float(stats.normalized_entropy(x)) == pytest.approx(0.0)


def test_zero_tokens_is_undefined_not_perfect():
    x = torch.zeros(8, dtype=torch.long)
    for fn in (stats.max_over_mean, stats.gini, stats.coefficient_of_variation, stats.normalized_entropy):
        assert math.isnan(float(fn(x))), fn.__name__
    assert int(stats.dead_count(x)) == 8
    s = stats.summarize_steps(torch.tensor([float("nan"), 1.5, 1.1]), worse=+1)
    assert s.mean == pytest.approx(1.3) and s.worst == pytest.approx(1.5)
    s = stats.summarize_steps(torch.tensor([0.9, 0.7]), worse=-1)
    assert s.worst == pytest.approx(0.7)
    assert math.isnan(stats.summarize_steps(torch.tensor([float("nan")]), +1).mean)


def test_per_rank_load_one_expert_per_rank_and_contiguous_placement():
    x = torch.tensor([1, 2, 3, 4, 5, 6])
    assert stats.per_rank_load(x, 6).tolist() == [1, 2, 3, 4, 5, 6]
    assert stats.per_rank_load(x, 3).tolist() == [3, 7, 11]  # rank r owns experts [2r, 2r+1]
    assert stats.per_rank_load(x, 1).tolist() == [21]
    with pytest.raises(ValueError, match="evenly"):
        stats.per_rank_load(x, 4)


def test_receiver_and_sender_skew_by_hand():
    m = torch.tensor([[10, 30], [20, 40]])  # rows send, columns receive
    # received: [30, 70], mean 50 -> 1.4 ; sent: [40, 60] mean 50 -> 1.2
    assert float(stats.receiver_skew(m)) == pytest.approx(1.4)
    assert float(stats.sender_skew(m)) == pytest.approx(1.2)


def test_locality_split_ep_not_dividing_node():
    # 6 GPUs per node, an EP group of 4 spanning ranks 4..7: ranks 4,5 on node 0 and 6,7 on node 1.
    nodes = stats.node_of_ranks([4, 5, 6, 7], gpus_per_node=6)
    assert nodes == [0, 0, 1, 1]
    m = torch.arange(16).reshape(4, 4)
    local, intra, inter = stats.locality_split(m, nodes).tolist()
    assert local == 0 + 5 + 10 + 15
    assert intra == 1 + 4 + 11 + 14
    assert inter == int(m.sum()) - local - intra
    cls = stats.locality_classes(nodes[1], nodes, 1).tolist()
    assert cls == [stats.INTRA_NODE, stats.LOCAL, stats.INTER_NODE, stats.INTER_NODE]
    with pytest.raises(ValueError):
        stats.node_of_ranks([0], gpus_per_node=0)


def test_batched_shapes_match_row_by_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (3, 5, 16), generator=g)
    for name, values in stats.layer_stats(x, ep_size=4).items():
        assert values.shape == (3, 5), name
        for s in range(3):
            row = stats.layer_stats(x[s], ep_size=4)[name]
            assert torch.equal(values[s], row), name


@pytest.mark.parametrize("seed", range(20))
def test_against_numpy_on_random_counts(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 65)) * 2
    # Mix of shapes: zipf-like skew, sparse with dead experts, and near-uniform.
    kind = seed % 3
    if kind == 0:
        x = rng.zipf(1.5, size=n).clip(max=10_000)
    elif kind == 1:
        x = rng.integers(0, 5, size=n) * rng.integers(0, 2, size=n)
    else:
        x = rng.integers(90, 110, size=n)
    t = torch.tensor(x)
    assert close(float(stats.gini(t)), np_gini(x))
    assert close(float(stats.normalized_entropy(t)), np_entropy(x))
    assert close(float(stats.coefficient_of_variation(t)), np_cv(x))
    assert close(float(stats.max_over_mean(t)), np_max_over_mean(x))
    assert int(stats.dead_count(t)) == int((x == 0).sum())
    ep = 2
    ranks = x.reshape(ep, -1).sum(1)
    assert close(float(stats.layer_stats(t, ep)["rank_max_over_mean"]), np_max_over_mean(ranks))
