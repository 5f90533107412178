"""Column sums of a router's boolean [tokens, experts] map, added in place to int64 counters.

The router hook's whole device work: `counts += routing_map.sum(0)` (and, on the capacity path,
kept and dropped counts from the map before and after dropping). On CUDA with Triton this is ONE
kernel launch per call: each program sums a block of rows of a block of expert columns in
registers and adds its partial sums with an int64 atomic add, so there is no temporary, no cast
kernel and no memset. The token count is a runtime argument that Triton is told never to
specialise on, and the grid does not depend on it (programs stride over the rows), so one
compiled kernel serves every micro-batch shape and a captured CUDA graph replays it unchanged.
Integer atomics make the result exact and order-independent.

Without Triton or CUDA (CPU, CI) the ATen pair below gives the same numbers. `prepare()`
compiles and loads the kernel at attach time, before any CUDA-graph capture, by running it once
on a tiny map (compilation inside a capture would fail).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("megatron_moe_probe")

ROW_PROGRAMS = 32  # programs along the token axis: fixed, so the grid never depends on the token count
BLOCK_T = 64  # rows each program loads per loop turn
BLOCK_E = 128  # expert columns per program

_kernel = None  # the @triton.jit function, built on first use where Triton and CUDA exist


def _build():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n_tokens"])
    def colsum_add(map_ptr, other_ptr, out_ptr, out2_ptr, n_tokens, n_experts, stride_t, other_stride_t,
                   TWO_MAPS: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, PROGRAMS: tl.constexpr):
        # out[e] += sum_t map[t, e]; with TWO_MAPS (capacity path: map = before dropping,
        # other = after): out[e] += sum_t (map & other)[t, e], out2[e] += sum_t (map & ~other)[t, e].
        pid_t = tl.program_id(0)
        pid_e = tl.program_id(1)
        cols = pid_e * BE + tl.arange(0, BE)
        col_ok = cols < n_experts
        acc = tl.zeros([BE], dtype=tl.int32)
        acc2 = tl.zeros([BE], dtype=tl.int32)
        for start in range(pid_t * BT, n_tokens, PROGRAMS * BT):
            rows = start + tl.arange(0, BT)
            ok = (rows[:, None] < n_tokens) & col_ok[None, :]
            m = tl.load(map_ptr + rows[:, None] * stride_t + cols[None, :], mask=ok, other=0).to(tl.int32)
            if TWO_MAPS:
                o = tl.load(other_ptr + rows[:, None] * other_stride_t + cols[None, :], mask=ok, other=0).to(tl.int32)
                kept = m * o
                acc += tl.sum(kept, axis=0)
                acc2 += tl.sum(m - kept, axis=0)
            else:
                acc += tl.sum(m, axis=0)
        tl.atomic_add(out_ptr + cols, acc.to(tl.int64), mask=col_ok)
        if TWO_MAPS:
            tl.atomic_add(out2_ptr + cols, acc2.to(tl.int64), mask=col_ok)

    return colsum_add


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def prepare(device: torch.device) -> bool:
    """Compile and load the kernel for `device` now (attach time, before graph capture) and check
    it against the ATen sums once. True when the Triton path is on; False: the ATen fallback."""
    global _kernel
    if not triton_available(device):
        return False
    try:
        if _kernel is None:
            _kernel = _build()
        g = torch.Generator(device="cpu").manual_seed(0)
        probe_map = (torch.rand(70, 5, generator=g) < 0.4).to(device)
        after = probe_map & (torch.rand(70, 5, generator=g) < 0.5).to(device)
        out = torch.zeros(5, dtype=torch.long, device=device)
        out2 = torch.zeros(5, dtype=torch.long, device=device)
        _launch(out, probe_map, None, None)
        _launch(out2, probe_map, after, out2)  # kept and dropped land in the same buffer: sums to the map's
        ok = torch.equal(out, probe_map.sum(0)) and torch.equal(out2, probe_map.sum(0))
        if not ok:
            log.warning("moe-probe: the Triton column-sum kernel disagrees with ATen here; using ATen")
        return ok
    except Exception as exc:  # no compiler, unsupported GPU...: the ATen pair is always right
        log.warning("moe-probe: Triton column-sum kernel unavailable (%s); using ATen", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False


def _launch(out: torch.Tensor, routing_map: torch.Tensor, after, dropped) -> None:
    n, e = routing_map.shape
    m = routing_map.view(torch.uint8) if routing_map.dtype == torch.bool else routing_map
    if m.stride(1) != 1:
        m = m.contiguous()
    if after is not None:
        a = after.view(torch.uint8) if after.dtype == torch.bool else after
        if a.stride(1) != 1:
            a = a.contiguous()
    else:
        a = m
    grid = (ROW_PROGRAMS, triton_cdiv(e, BLOCK_E))
    _kernel[grid](m, a, out, dropped if dropped is not None else out, n, e, m.stride(0), a.stride(0),
                  TWO_MAPS=after is not None, BT=BLOCK_T, BE=BLOCK_E, PROGRAMS=ROW_PROGRAMS)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def add_column_sums(out: torch.Tensor, routing_map: torch.Tensor, use_triton: bool) -> None:
    """out[E] (int64) += routing_map[T, E].sum(0)."""
    if use_triton:
        _launch(out, routing_map, None, None)
    else:
        out.add_(routing_map.sum(0))


def add_kept_and_dropped(kept_out: torch.Tensor, dropped_out: torch.Tensor, before: torch.Tensor,
                         after: torch.Tensor, use_triton: bool) -> None:
    """kept_out += (before & after).sum(0); dropped_out += (before & ~after).sum(0)."""
    if use_triton:
        _launch(kept_out, before, after, dropped_out)
    else:
        kept = (before & after).sum(0)
        kept_out.add_(kept)
        dropped_out.add_(before.sum(0) - kept)
