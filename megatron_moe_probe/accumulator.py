"""RoutingAccumulator: device-side routing counts, read once per log interval.

No I/O and no Megatron imports: the router hooks (megatron/hooks.py) call `add_routing_map` /
`add_capacity_maps`, the session (session.py) calls `step()` after each iteration, and at a
flush asks for `device_parts()` (the int64 tensors to sum over all ranks) and hands the reduced
CPU copies back to `read()`, which builds the interval's `Snapshot`. Every hot-path call is one
asynchronous device kernel (colsum.py); the only host synchronization is the session's one
device->host copy per interval.

CUDA graphs: router calls add into one fixed `[L, E]` buffer for the iteration in progress,
whatever the iteration, and `step()` (eager, host side) moves it into the per-step history. So
the hot-path kernel can be captured into a CUDA graph and replayed with no Python: every replay
adds to the same buffer, and the step it belongs to is chosen outside the graph. Buffers are
never reallocated, and an accumulator whose kernels were captured is kept alive for the life of
the process (a replay after detach would otherwise write into freed memory).

Counting rules (see docs/metrics.md):
- counts are token->expert assignments made by the router, after capacity dropping
  (padding added by `--moe-pad-expert-input-to-capacity` is not counted);
- rows are global layer numbers, so pipeline stages and virtual stages fill disjoint rows;
- ranks whose router sees a copy of another rank's tokens (tensor parallelism
  without sequence parallelism) contribute with weight 0, every other rank is summed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_moe_probe import colsum, stats


@dataclass(frozen=True)
class RankLayout:
    """What this rank needs to know to place its counts in the global picture."""

    num_layer_slots: int  # rows of the count buffers: every global layer number (+ MTP layers)
    num_experts: int
    ep_size: int
    ep_rank: int
    # Locality class (stats.LOCAL / INTRA_NODE / INTER_NODE) of each destination EP rank, seen from here.
    destination_locality: tuple[int, ...]
    count_weight: int = 1  # 0 on tensor-parallel ranks that see duplicate tokens, else 1
    gpus_per_node: int = 8

    def __post_init__(self):
        if self.num_experts % self.ep_size:
            raise ValueError(f"{self.num_experts} experts do not divide over EP={self.ep_size}")
        if len(self.destination_locality) != self.ep_size:
            raise ValueError("destination_locality needs one entry per EP rank")


@dataclass
class Snapshot:
    """One interval's global counts (CPU tensors), produced by a session's flush."""

    step: int
    steps: int  # iterations folded into the interval
    layers: list[int]  # 1-based global layer numbers of the MoE layers that reported
    num_experts: int
    ep_size: int
    tokens_per_expert: torch.Tensor  # [L, E] summed over the interval
    step_tokens_per_expert: torch.Tensor  # [S, L, E], one row per step kept in history
    source_expert_counts: torch.Tensor  # [L, EP_src, E]
    locality: torch.Tensor  # [L, 3] local / intra-node / inter-node assignments
    dropped_per_expert: Optional[torch.Tensor] = None  # [L, E]
    dropped_per_source: Optional[torch.Tensor] = None  # [L, EP_src]
    # Per-iteration rank-to-rank matrices [S, L, EP_src, EP_dst] (with iteration_matrix=True).
    step_rank_matrix: Optional[torch.Tensor] = None
    # Interval counts split by the domain (dataset) of each token's sample, [D, L, E] (with domains).
    domain_tokens_per_expert: Optional[torch.Tensor] = None
    domains: list[str] = field(default_factory=list)
    timing_ms: dict[str, torch.Tensor] = field(default_factory=dict)  # phase -> [L] mean ms per step
    # Interval contributors' results (session.IntervalContributor), one block per contributor name.
    extras: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    meta: dict = field(default_factory=dict)


class RoutingAccumulator:
    """Accumulates routing counts on the device.

    history_steps bounds memory: per-step counts are kept for at most that many
    steps per interval (the interval sums stay exact beyond it; the per-step
    summaries then cover the most recent steps and `meta["history_folded"]` says so).
    """

    def __init__(
        self,
        layout: RankLayout,
        device: torch.device | str = "cpu",
        history_steps: int = 100,
        track_capacity: bool = False,
        domains: Optional[list[str]] = None,
        iteration_matrix: bool = False,
    ):
        if history_steps < 1:
            raise ValueError("history_steps must be >= 1")
        self.layout = layout
        self.device = torch.device(device)
        self.history_steps = history_steps
        self.track_capacity = track_capacity
        L, E = layout.num_layer_slots, layout.num_experts
        # One spare row: a flush that comes exactly when `history_steps` steps are recorded
        # (the usual case, history = interval) must still find them all in the history.
        self._history = torch.zeros(history_steps + 1, L, E, dtype=torch.long, device=self.device)
        self._folded = torch.zeros(L, E, dtype=torch.long, device=self.device)
        self._dropped = torch.zeros(L, E, dtype=torch.long, device=self.device) if track_capacity else None
        # The iteration in progress (fixed addresses: graph-capturable), moved into history by step().
        self._current = torch.zeros(L, E, dtype=torch.long, device=self.device)
        self._current_rows = list(self._current.unbind(0))  # one view per layer, made once
        self._current_dropped = torch.zeros(L, E, dtype=torch.long, device=self.device) if track_capacity else None
        self._current_dropped_rows = list(self._current_dropped.unbind(0)) if track_capacity else []
        self._present = torch.zeros(L, dtype=torch.long, device=self.device)  # which layers this rank owns
        self._failed = torch.zeros(1, dtype=torch.long, device=self.device)
        self.iteration_matrix = iteration_matrix
        # Per-domain counts: [D, L, E] for the iteration in progress and for the interval. A token's
        # domain is read from `_token_domain` (fixed address, filled by set_sample_domains before
        # each micro-batch's forward), so the hot path stays graph-capturable.
        self.domains = list(domains or [])
        D = len(self.domains)
        self._domain = torch.zeros(D, L, E, dtype=torch.long, device=self.device) if D else None
        self._current_domain = torch.zeros(L, D, E, dtype=torch.long, device=self.device) if D else None
        self._current_domain_rows = list(self._current_domain.unbind(0)) if D else []
        self._token_domain: Optional[torch.Tensor] = None  # [tokens] int64 domain index per token
        self._domain_lookup: Optional[torch.Tensor] = None  # dataset id -> domain index
        self.domain_tokens_unlabelled = False  # a router call had more tokens than the domain buffer
        self._slot = 0
        self._steps = 0
        self._folds = 0
        self.step_number = 0
        self.failed = False  # set when a hook failed on this rank; counts may be incomplete
        # The one-kernel Triton path, compiled and loaded now (before any graph capture).
        self.use_triton = colsum.prepare(self.device)
        # Dense class per destination EP rank (stats.locality_onehot), applied once per flush.
        self._locality_onehot = stats.locality_onehot(layout.destination_locality).to(self.device)

    # ---- hot path (called from hooks; one device kernel each) --------------------------------

    def register_layer(self, slot: int) -> None:
        self._present[slot] = 1

    def add_routing_map(self, slot: int, routing_map: torch.Tensor, flag: Optional[torch.Tensor] = None) -> None:
        """Add one router call's [tokens, experts] boolean map to layer `slot`. `flag`: a call
        captured into a CUDA graph passes the gate's device flag (CountingGate.capture_flag), and
        every replay adds map x flag: nothing while no training iteration is open."""
        colsum.add_column_sums(self._current_rows[slot], routing_map, self.use_triton, flag)
        if self._current_domain is not None:
            self._add_domains(slot, routing_map, flag)

    def add_capacity_maps(self, slot: int, before: torch.Tensor, after: torch.Tensor,
                          flag: Optional[torch.Tensor] = None) -> None:
        """Capacity path: the map before and after dropping. Kept = before & after is counted,
        before & ~after goes to the dropped counts; padding (after & ~before) is not counted.
        `flag` as in add_routing_map."""
        colsum.add_kept_and_dropped(self._current_rows[slot], self._current_dropped_rows[slot], before, after,
                                    self.use_triton, flag)
        if self._current_domain is not None:
            self._add_domains(slot, before & after, flag)

    def _add_domains(self, slot: int, routing_map: torch.Tensor, flag: Optional[torch.Tensor] = None) -> None:
        """One scatter-add of the call's map into [domain, expert] rows, by each token's domain."""
        if self._token_domain is None:
            return
        n = routing_map.shape[0]  # a shape, known on the host: no sync
        if n > self._token_domain.shape[0]:
            self.domain_tokens_unlabelled = True  # more tokens than the micro-batch that set domains
            return
        rows = routing_map.to(torch.long)
        self._current_domain_rows[slot].index_add_(0, self._token_domain[:n], rows if flag is None else rows * flag)

    # ---- per micro-batch (host side, device kernels only) -------------------------------------

    def set_domain_table(self, dataset_to_domain: list[int]) -> None:
        """Which domain each dataset id of the blend belongs to (index into `domains`)."""
        if not self.domains:
            raise ValueError("this accumulator counts no domains (made without `domains`)")
        bad = [d for d in dataset_to_domain if not 0 <= d < len(self.domains)]
        if bad:
            raise ValueError(f"domain index {bad[0]} outside 0..{len(self.domains) - 1}")
        self._domain_lookup = torch.tensor(dataset_to_domain, dtype=torch.long, device=self.device)

    def set_sample_domains(self, dataset_ids: torch.Tensor, seq_length: int, frozen: bool = False) -> None:
        """The next micro-batch's dataset id per sample ([micro_batch] ints, any device).

        Router calls see the micro-batch flattened sequence-major ([s, b] -> s*b rows), so
        token t belongs to sample t % b: the per-sample ids tiled over `seq_length`
        positions give every token its domain, also for the sequence slice a TP rank sees
        with sequence parallelism or a CP rank sees (both keep whole [s, b] rows). The
        buffer is allocated at the first call and only written in place afterwards; `frozen`
        (hook kernels were captured into a CUDA graph, which holds its address) forbids growing it."""
        if self._current_domain is None:
            return
        ids = dataset_ids.reshape(-1).to(self.device, torch.long, non_blocking=True)
        if self._domain_lookup is not None:
            ids = self._domain_lookup[ids]
        n = ids.shape[0] * int(seq_length)
        if self._token_domain is None or self._token_domain.shape[0] < n:
            if frozen:
                raise RuntimeError("the domain buffer cannot grow after CUDA-graph capture")
            self._token_domain = torch.zeros(n, dtype=torch.long, device=self.device)
        self._token_domain[:n].copy_(ids.repeat(int(seq_length)))

    def discard_current(self) -> None:
        """Forget the iteration in progress (Megatron re-ran its forward/backward: count the last run)."""
        self._current.zero_()
        if self._current_dropped is not None:
            self._current_dropped.zero_()
        if self._current_domain is not None:
            self._current_domain.zero_()

    # ---- per iteration (host only) -----------------------------------------------------------

    def step(self) -> None:
        """Close the current iteration. No host sync: two device copies, and a fold (device add)
        only when history is full."""
        self._history[self._slot].copy_(self._current)
        self._current.zero_()
        if self._current_dropped is not None:
            self._dropped.add_(self._current_dropped)
            self._current_dropped.zero_()
        if self._current_domain is not None:
            self._domain.add_(self._current_domain.transpose(0, 1))
            self._current_domain.zero_()
        self._steps += 1
        self.step_number += 1
        self._slot += 1
        if self._slot == self._history.shape[0]:
            self._folded.add_(self._history.sum(0))
            self._history.zero_()
            self._slot = 0
            self._folds += 1

    @property
    def steps_in_interval(self) -> int:
        return self._steps

    # ---- once per interval: device parts to reduce, then the snapshot -------------------------

    def device_parts(self) -> list[torch.Tensor]:
        """This rank's interval as 1-D int64 device tensors, to be summed over all ranks (the
        session concatenates them with its contributors' parts into one all-reduce)."""
        lay = self.layout
        L, E, EP = lay.num_layer_slots, lay.num_experts, lay.ep_size
        kept = self._slot  # rows of history that belong to steps after the last fold
        hist = self._history[:kept]
        interval = self._folded + hist.sum(0)  # [L, E] this rank's interval sum
        source = torch.zeros(L, EP, E, dtype=torch.long, device=self.device)
        source[:, lay.ep_rank] = interval
        per_destination = interval.view(L, EP, E // EP).sum(-1)  # [L, EP]
        # Elementwise, not a matmul: CUDA has no int64 matmul, and these counts must stay exact.
        locality = (per_destination.unsqueeze(-1) * self._locality_onehot).sum(-2)  # [L, 3]
        parts = [hist.reshape(-1), source.reshape(-1), locality.reshape(-1)]
        if self._dropped is not None:
            dropped_source = torch.zeros(L, EP, E, dtype=torch.long, device=self.device)
            dropped_source[:, lay.ep_rank] = self._dropped
            parts.append(dropped_source.reshape(-1))
        if self.iteration_matrix:
            # This rank's per-iteration sends per destination rank, in its own source row.
            step_source = torch.zeros(kept, L, EP, EP, dtype=torch.long, device=self.device)
            step_source[:, :, lay.ep_rank] = hist.view(kept, L, EP, E // EP).sum(-1)
            parts.append(step_source.reshape(-1))
        if self.domains:
            parts.append(self._domain.reshape(-1))
        if lay.count_weight == 0:  # duplicate tokens (TP without SP): report layer ownership only
            parts = [torch.zeros_like(p) for p in parts]
        self._failed.fill_(int(self.failed))
        return parts + [self._present, self._failed]

    def read(self, reduced: list[torch.Tensor], step: Optional[int] = None) -> Snapshot:
        """The Snapshot from the all-reduced CPU copies of `device_parts()` (same order)."""
        lay = self.layout
        L, E, EP = lay.num_layer_slots, lay.num_experts, lay.ep_size
        kept = self._slot
        hist_g = reduced[0].view(kept, L, E)
        source_g = reduced[1].view(L, EP, E)
        locality_g = reduced[2].view(L, 3)
        present = reduced[-2] > 0
        ranks_failed = int(reduced[-1][0])
        rows = present.nonzero().flatten()
        snap = Snapshot(
            step=self.step_number if step is None else step,
            steps=self._steps,
            layers=[int(r) + 1 for r in rows],
            num_experts=E,
            ep_size=EP,
            tokens_per_expert=source_g.sum(1)[rows],
            step_tokens_per_expert=hist_g[:, rows],
            source_expert_counts=source_g[rows],
            locality=locality_g[rows],
            meta={"history_folded": self._folds > 0, "steps_in_history": kept, "ranks_failed": ranks_failed},
        )
        at = 3
        if self._dropped is not None:
            dropped_g = reduced[at].view(L, EP, E)[rows]
            snap.dropped_per_expert = dropped_g.sum(1)
            snap.dropped_per_source = dropped_g.sum(2)
            at += 1
        if self.iteration_matrix:
            snap.step_rank_matrix = reduced[at].view(kept, L, EP, EP)[:, rows]
            at += 1
        if self.domains:
            snap.domain_tokens_per_expert = reduced[at].view(len(self.domains), L, E)[:, rows]
            snap.domains = list(self.domains)
            # Assignments no domain received (micro-batches that set no domains): 0 when every
            # micro-batch set its domains. Host arithmetic on the copied buffer, no extra sync.
            snap.meta["domain_unlabelled"] = int(snap.tokens_per_expert.sum() - snap.domain_tokens_per_expert.sum())
            if self.domain_tokens_unlabelled:
                snap.meta["domain_buffer_too_small"] = True
        return snap

    def reset(self) -> None:
        self._history.zero_()
        self._folded.zero_()
        if self._dropped is not None:
            self._dropped.zero_()
        if self._domain is not None:
            self._domain.zero_()
        self._slot = 0
        self._steps = 0
        self._folds = 0
