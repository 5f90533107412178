"""Conservation checks of the MoE token exchange: device-side sums, one verdict per interval.

Pure torch, no Megatron: `megatron/exchange_check.py` feeds it from hooks on the token
dispatchers; this module owns the buffers, the fingerprint and the verdict.

What is checked (docs/metrics.md, "Dispatch integrity"), per layer and global expert, summed
over every rank and every checked forward of the interval:

- dispatch_count: rows sent to the expert (the router's assignments after capacity dropping;
  capacity rows each with padding), times the expert-TP replication, equal rows the expert's
  rank(s) received (the dispatcher's own `tokens_per_expert`);
- dispatch_payload: the same for a fingerprint of the rows' bytes;
- combine_payload: the fingerprint of the expert outputs each expert's rank sends back equals
  that of the rows its sources receive (alltoall; allgather combines by a reduce-scatter, a
  sum, not a transfer);
- combine_rows: per layer, the rows every source sent equal the rows that came back.

The fingerprint of a row is 8 fixed random projections of its bytes (bf16/fp16/fp32/fp8 all
viewed as int8) with nonzero int8 weights, computed as one int8 GEMM with exact int32 results,
then summed per expert in int64. Sums are order independent, so the exchange may reorder rows;
any single changed byte changes all 8 projections (weights are nonzero, arithmetic exact), a
dropped, duplicated or misrouted row changes the sums of its expert(s) unless its
fingerprint is zero in all 8, and distinct weights per byte position catch swapped values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

FINGERPRINT_WIDTH = 8
CHECKS = ("dispatch_count", "dispatch_payload", "combine_payload", "combine_rows")
MAX_LISTED_VIOLATIONS = 20
_WEIGHT_SEED = 0x5EED_23

_weights: dict[tuple[int, str], torch.Tensor] = {}


def fingerprint_weights(num_bytes: int, device: torch.device) -> torch.Tensor:
    """[num_bytes, 8] int8, every entry in ±[1, 127]; the same on every rank (fixed seed)."""
    key = (num_bytes, str(device))
    w = _weights.get(key)
    if w is None:
        g = torch.Generator().manual_seed(_WEIGHT_SEED)
        magnitude = torch.randint(1, 128, (FINGERPRINT_WIDTH, num_bytes), generator=g)
        sign = torch.randint(0, 2, (FINGERPRINT_WIDTH, num_bytes), generator=g) * 2 - 1
        # stored [8, B] and used transposed: column-major, as the int8 GEMM wants its second operand
        w = (magnitude * sign).to(torch.int8).to(device).t()
        _weights[key] = w
    return w


def row_fingerprints(rows: torch.Tensor) -> torch.Tensor:
    """[m, ...] tensor -> [m, 8] exact integer projections of each row's bytes (int32 or int64)."""
    m = rows.shape[0]
    flat = rows.reshape(m, -1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    as_bytes = flat.view(torch.int8)
    w = fingerprint_weights(as_bytes.shape[1], as_bytes.device)
    if m > 16 and as_bytes.shape[1] % 8 == 0:
        # |sum| <= bytes * 128 * 127 < 2**31 for rows up to 131,000 bytes: exact in int32
        return torch._int_mm(as_bytes, w)
    # tiny or odd-sized inputs: float64 is exact here too (|sum| < 2**53)
    return (as_bytes.to(torch.float64) @ w.to(torch.float64)).to(torch.int64)


def segment_sums(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive row segments of `values` [m, K] with sizes `counts` [S] (device
    tensor), as int64 [S, K]. No host sync; segments past the end are clamped (a count that
    does not match the rows then shows up as a difference, never as an indexing error)."""
    m = values.shape[0]
    prefix = torch.nn.functional.pad(values.cumsum(0, dtype=torch.int64), (0, 0, 1, 0))
    ends = counts.cumsum(0)
    starts = ends - counts
    return prefix[ends.clamp(0, m)] - prefix[starts.clamp(0, m)]


class IntegrityAccumulator:
    """Interval sums of what was sent and what was received, per layer slot and global expert,
    in one flat int64 device buffer (so one all-reduce sums them over ranks)."""

    def __init__(self, num_slots: int, num_experts: int, device: torch.device):
        self.num_slots, self.num_experts, self.device = num_slots, num_experts, device
        L, E, K = num_slots, num_experts, FINGERPRINT_WIDTH
        shapes = {
            "sent_count": (L, E), "received_count": (L, E),
            "dispatch_sent": (L, E, K), "dispatch_received": (L, E, K),
            "combine_sent": (L, E, K), "combine_received": (L, E, K),
        }
        self._shapes = shapes
        self._sizes = [int(torch.Size(s).numel()) for s in shapes.values()]
        self.buffer = torch.zeros(sum(self._sizes), dtype=torch.int64, device=device)
        self.views = self.unpack(self.buffer)
        self.sent_rows = list(self.views["sent_count"].unbind(0))  # one view per layer, made once
        # Counts the dispatcher already holds on the host (its tokens_per_expert after the
        # exchange, the capacity of padded experts): added here with no kernel, moved into the
        # buffer once per interval (fold_host_counts).
        self.host_counts = {"sent_count": torch.zeros(L, E, dtype=torch.int64),
                            "received_count": torch.zeros(L, E, dtype=torch.int64)}
        # Host-known numbers (tensor shapes, call counts), per slot: no kernel per call for them.
        self.rows_dispatched = [0] * L  # rows each rank dispatched (alltoall)
        self.rows_returned = [0] * L  # rows that came back from token_combine (alltoall)
        self.count_calls = [0] * L  # forwards count-checked
        self.payload_calls = [0] * L  # forwards payload-checked

    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of a flat tensor laid out like `buffer` (the buffer, or its reduced copy)."""
        return {name: part.view(shape) for (name, shape), part in zip(self._shapes.items(), flat.split(self._sizes))}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.views[name]

    def fold_host_counts(self) -> None:
        """Before the interval's all-reduce: the host-side counts into the device buffer."""
        for name, counts in self.host_counts.items():
            self.views[name] += counts.to(self.device)
            counts.zero_()

    def host_part(self) -> torch.Tensor:
        return torch.tensor(self.rows_dispatched + self.rows_returned + self.count_calls + self.payload_calls,
                            dtype=torch.int64)

    def unpack_host(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        names = ("rows_dispatched", "rows_returned", "count_calls", "payload_calls")
        return dict(zip(names, flat.split(self.num_slots)))

    def reset(self) -> None:
        self.buffer.zero_()
        for counts in self.host_counts.values():
            counts.zero_()
        L = self.num_slots
        self.rows_dispatched, self.rows_returned, self.count_calls, self.payload_calls = [0] * L, [0] * L, [0] * L, [0] * L


@dataclass
class Verdict:
    """The interval's integrity result as plain data (the record's `integrity` block)."""

    checked_layers: list[int]  # 1-based layer numbers with at least one checked forward
    count_calls: int  # dispatcher forwards count-checked, summed over ranks and layers
    payload_calls: int  # of those, also payload-checked
    payload_every: int
    violations: list[dict]  # the first MAX_LISTED_VIOLATIONS, most severe first
    violation_count: int
    unchecked: list[str]  # dispatcher types seen but not covered (flex)

    @property
    def ok(self) -> bool:
        return self.violation_count == 0

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked_layers": self.checked_layers, "count_calls": self.count_calls,
                "payload_calls": self.payload_calls, "payload_every": self.payload_every,
                "violation_count": self.violation_count, "violations": self.violations,
                "unchecked": self.unchecked}


def judge(flat: torch.Tensor, host: torch.Tensor, acc: IntegrityAccumulator, *, ep_size: int,
          payload_every: int, unchecked: Optional[list[str]] = None) -> Verdict:
    """Compare the all-reduced sums (`flat`: the buffer, `host`: the host-known counts, both CPU)."""
    E = acc.num_experts
    views = acc.unpack(flat)
    views.update(acc.unpack_host(host))
    per_rank = max(1, E // max(1, ep_size))
    found: list[dict] = []

    def add(check, slot, expert, sent, received, size):
        found.append({"check": check, "layer": slot + 1, "expert": expert,
                      "rank": None if expert is None else expert // per_rank,
                      "sent": sent, "received": received, "difference": size})

    counted = views["count_calls"] > 0
    paid = views["payload_calls"] > 0
    sent, got = views["sent_count"], views["received_count"]
    for slot, expert in (sent != got).nonzero().tolist():
        if counted[slot]:
            s, r = int(sent[slot, expert]), int(got[slot, expert])
            add("dispatch_count", slot, expert, s, r, r - s)
    for check, a, b in (("dispatch_payload", "dispatch_sent", "dispatch_received"),
                        ("combine_payload", "combine_sent", "combine_received")):
        diff = views[b] - views[a]
        bad = (diff != 0).any(-1)
        for slot, expert in bad.nonzero().tolist():
            if paid[slot]:
                # size: how many of the 8 projections differ, and their largest absolute difference
                d = diff[slot, expert]
                add(check, slot, expert, None, None,
                    {"projections": int((d != 0).sum()), "max_abs": int(d.abs().max())})
    rows_out, rows_back = views["rows_dispatched"], views["rows_returned"]
    for slot in (rows_out != rows_back).nonzero().flatten().tolist():
        add("combine_rows", slot, None, int(rows_out[slot]), int(rows_back[slot]),
            int(rows_back[slot] - rows_out[slot]))
    return Verdict(
        checked_layers=[s + 1 for s in counted.nonzero().flatten().tolist()],
        count_calls=int(views["count_calls"].sum()),
        payload_calls=int(views["payload_calls"].sum()),
        payload_every=payload_every,
        violations=found[:MAX_LISTED_VIOLATIONS],
        violation_count=len(found),
        unchecked=sorted(set(unchecked or [])),
    )
