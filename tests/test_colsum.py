"""The hook's one kernel (colsum.py): column sums added in place, exact against independent sums.

On CPU (CI) only the ATen fallback runs; on a CUDA machine with Triton the same tests check the
Triton kernel against Python's own counting, over token counts that are not multiples of the
block, and over CUDA-graph replays (the kernel must not specialise on the token count)."""

from __future__ import annotations

import pytest
import torch

from megatron_moe_probe import colsum

CUDA = torch.cuda.is_available() and colsum.triton_available(torch.device("cuda"))
PATHS = [("cpu", False)] + ([("cuda", True), ("cuda", False)] if CUDA else [])


def _map(tokens: int, experts: int, topk: int, seed: int) -> torch.Tensor:
    """A router-like map: exactly `topk` experts per token, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g)
    out = torch.zeros(tokens, experts, dtype=torch.bool)
    out.scatter_(1, scores.topk(topk, dim=1).indices, True)
    return out


def _python_column_sums(m: torch.Tensor) -> list[int]:
    rows = m.tolist()
    return [sum(int(r[e]) for r in rows) for e in range(m.shape[1])]


@pytest.mark.parametrize("device,use_triton", PATHS)
@pytest.mark.parametrize("tokens,experts,topk", [(1, 8, 2), (37, 8, 2), (130, 128, 8), (4099, 160, 6)])
def test_column_sums_add_exactly(device, use_triton, tokens, experts, topk):
    if use_triton:
        assert colsum.prepare(torch.device(device))
    m = _map(tokens, experts, topk, seed=tokens)
    out = torch.full((experts,), 5, dtype=torch.long, device=device)  # adds to what is there
    colsum.add_column_sums(out, m.to(device), use_triton)
    colsum.add_column_sums(out, m.to(device), use_triton)
    expected = [5 + 2 * c for c in _python_column_sums(m)]
    assert out.cpu().tolist() == expected
    assert sum(expected) - 5 * experts == 2 * tokens * topk


@pytest.mark.parametrize("device,use_triton", PATHS)
def test_capacity_counts_kept_and_dropped_not_padding(device, use_triton):
    before = _map(300, 16, 4, seed=1)
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(300, 16, generator=g) < 0.7
    pad = torch.rand(300, 16, generator=g) < 0.05
    after = (before & keep) | (pad & ~before)  # dropped some assignments, padded some empty slots
    kept = torch.zeros(16, dtype=torch.long, device=device)
    dropped = torch.zeros(16, dtype=torch.long, device=device)
    colsum.add_kept_and_dropped(kept, dropped, before.to(device), after.to(device), use_triton)
    assert kept.cpu().tolist() == _python_column_sums(before & keep)
    assert dropped.cpu().tolist() == _python_column_sums(before & ~keep)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
def test_triton_kernel_replays_exactly_in_a_cuda_graph():
    assert colsum.prepare(torch.device("cuda"))
    m = _map(4096, 128, 8, seed=3).cuda()
    static = m.clone()
    out = torch.zeros(128, dtype=torch.long, device="cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            colsum.add_column_sums(out, static, True)
    torch.cuda.synchronize()
    assert out.sum().item() == 0  # the capture itself adds nothing
    maps = [_map(4096, 128, 8, seed=10 + i) for i in range(3)]
    for mm in maps:
        static.copy_(mm.cuda())
        graph.replay()
    torch.cuda.synchronize()
    assert out.cpu().tolist() == [sum(c) for c in zip(*(_python_column_sums(mm) for mm in maps))]
