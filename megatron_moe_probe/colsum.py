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
on a small map and checking it against ATen (compilation inside a capture would fail).

The launch: Triton's `kernel[grid](...)` re-derives a specialisation key from every argument on
every call, which is most of a launch's host time. The kernel is compiled with no
specialisation at all (every integer and every pointer's alignment left generic), so the one
compiled binary is valid for any call with the same dtypes; `prepare()` keeps it, and each call
goes straight to its launcher. Where that direct launch is unavailable or disagrees with ATen,
the ordinary `kernel[grid](...)` launch is used.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("megatron_moe_probe")

ROW_PROGRAMS = 32  # programs along the token axis: fixed, so the grid never depends on the token count
BLOCK_T = 64  # rows each program loads per loop turn
BLOCK_E = 128  # expert columns per program

_kernel = None  # the @triton.jit function, built on first use where Triton and CUDA exist
_compiled: dict = {}  # TWO_MAPS -> the compiled kernel, launched directly (see the module docstring)
direct_launch = True  # False: always launch through kernel[grid](...) (benchmarks compare the two)


def _build():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n_tokens", "n_experts", "stride_t", "other_stride_t"],
                do_not_specialize_on_alignment=["map_ptr", "other_ptr", "out_ptr", "out2_ptr"])
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
        want = probe_map.sum(0)
        ok = True
        for direct in (False, True):  # the JIT launch compiles; then the direct launch of that binary
            if direct:
                _keep_compiled(probe_map)
                if not _compiled:
                    break
            out = torch.zeros(5, dtype=torch.long, device=device)
            out2 = torch.zeros(5, dtype=torch.long, device=device)
            try:
                _launch(out, probe_map, None, None, direct)
                _launch(out2, probe_map, after, out2, direct)  # kept and dropped in one buffer: the map's sums
                good = torch.equal(out, want) and torch.equal(out2, want)
            except Exception:
                if not direct:
                    raise
                good = False
            if not good and direct:
                log.warning("moe-probe: the direct Triton launch disagrees with ATen here; using kernel[grid]")
                _compiled.clear()
            ok = ok and (good or direct)
        if not ok:
            log.warning("moe-probe: the Triton column-sum kernel disagrees with ATen here; using ATen")
        return ok
    except Exception as exc:  # no compiler, unsupported GPU...: the ATen pair is always right
        log.warning("moe-probe: Triton column-sum kernel unavailable (%s); using ATen", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False


def _keep_compiled(probe_map: torch.Tensor) -> None:
    """The compiled binaries (one per TWO_MAPS) and their launchers, for direct launches."""
    try:
        m = probe_map.view(torch.uint8)
        out = torch.zeros(probe_map.shape[1], dtype=torch.long, device=probe_map.device)
        for two in (False, True):
            k = _kernel.warmup(m, m, out, out, m.shape[0], m.shape[1], m.stride(0), m.stride(0), TWO_MAPS=two,
                               BT=BLOCK_T, BE=BLOCK_E, PROGRAMS=ROW_PROGRAMS, grid=(ROW_PROGRAMS, 1))
            if hasattr(k, "result"):
                k = k.result()
            k._init_handles()
            _compiled[two] = (k.run, k.function, k.packed_metadata)
    except Exception as exc:
        log.warning("moe-probe: no direct Triton launch here (%s); using kernel[grid]", type(exc).__name__)
        _compiled.clear()


def _launch(out: torch.Tensor, routing_map: torch.Tensor, after, dropped, direct: bool = True) -> None:
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
    two = after is not None
    columns = triton_cdiv(e, BLOCK_E)
    compiled = _compiled.get(two) if (direct and direct_launch) else None
    if compiled is not None:
        run, function, packed = compiled
        stream = torch._C._cuda_getCurrentRawStream(out.device.index)
        run(ROW_PROGRAMS, columns, 1, stream, function, packed, None, None, None,
            m, a, out, dropped if dropped is not None else out, n, e, m.stride(0), a.stride(0),
            two, BLOCK_T, BLOCK_E, ROW_PROGRAMS)
        return
    _kernel[(ROW_PROGRAMS, columns)](m, a, out, dropped if dropped is not None else out, n, e, m.stride(0),
                                     a.stride(0), TWO_MAPS=two, BT=BLOCK_T, BE=BLOCK_E, PROGRAMS=ROW_PROGRAMS)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def add_column_sums(out: torch.Tensor, routing_map: torch.Tensor, use_triton: bool,
                    flag: torch.Tensor | None = None) -> None:
    """out[E] (int64) += routing_map[T, E].sum(0). `flag` (a 0-d int64 device tensor): the sums
    are multiplied by it, read when the work runs: for a call being captured into a CUDA graph,
    whose replays must add nothing while the flag is 0 (the ATen ops, not the kernel)."""
    if use_triton and flag is None:
        _launch(out, routing_map, None, None)
    else:
        out.add_(_scaled(routing_map.sum(0), flag))


def add_kept_and_dropped(kept_out: torch.Tensor, dropped_out: torch.Tensor, before: torch.Tensor,
                         after: torch.Tensor, use_triton: bool, flag: torch.Tensor | None = None) -> None:
    """kept_out += (before & after).sum(0); dropped_out += (before & ~after).sum(0); `flag` as in
    add_column_sums."""
    if use_triton and flag is None:
        _launch(kept_out, before, after, dropped_out)
    else:
        kept = (before & after).sum(0)
        kept_out.add_(_scaled(kept, flag))
        dropped_out.add_(_scaled(before.sum(0) - kept, flag))


def _scaled(sums: torch.Tensor, flag: torch.Tensor | None) -> torch.Tensor:
    return sums if flag is None else sums * flag
