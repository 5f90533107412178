"""Output size per 1000 iterations of Megatron's own routing recorders and the probe, at the
Qwen3-30B-A3B shape, computed by encoding records in each recorder's own format (README table).

Assumed: 48 MoE layers, 128 experts, top-8, hidden 2048, seq 4096, 8 GPUs (EP 8, TP 1, PP 1),
micro-batch 1, global batch 64 sequences (8 micro-batches per rank, 262,144 tokens per iteration),
routing uniform at random (index widths and count widths as in a balanced run)."""

import json
import math

import torch

from megatron_moe_probe.accumulator import Snapshot
from megatron_moe_probe.summarize import build_report
from megatron_moe_probe.record import encode_report

LAYERS, E, K, SEQ, GPUS, EP, MBS, GBS = 48, 128, 8, 4096, 8, 8, 1, 64
ITERS = 1000
micro = GBS // (GPUS * MBS)  # per rank per iteration
g = torch.Generator().manual_seed(0)

# RouterTracer: one record per router call (rank x layer x micro-batch), JSON with the top-k indices.
idx = torch.rand(SEQ * MBS, E, generator=g).topk(K, dim=1).indices.int()
rec = {"step": 500, "stage": "pre_dispatch", "block": "decoder", "layer": 23, "rank": 3,
       "num_tokens": SEQ * MBS, "topk": K, "top_indices": idx.tolist()}
trace_record = len(json.dumps(rec)) + 1
trace = trace_record * GPUS * LAYERS * micro * ITERS

# save_tpe: one record per rank x layer per sampled iteration, counts per local expert per micro-batch.
per_local = SEQ * MBS * K * EP // E  # tokens a local expert receives from all EP ranks per micro-batch
tpe_rec = {"iter": 500, "block": "decoder", "layer": 23,
           "tpe": [[per_local + (j % 7) * 13 for j in range(E // EP)] for _ in range(micro)]}
tpe = (len(json.dumps(tpe_rec)) + 1) * GPUS * LAYERS * ITERS  # --save-tokens-per-expert-interval 1

# The probe: one IntervalReport per interval (all layers), intervals.jsonl.
def probe_bytes(interval):
    tokens = SEQ * MBS * micro * GPUS * K * interval
    counts = torch.multinomial(torch.ones(E), tokens, replacement=True, generator=g).bincount(minlength=E)
    tpe_l = counts.expand(LAYERS, E).clone()
    source = (tpe_l.unsqueeze(1) // EP).expand(LAYERS, EP, E).clone()
    snap = Snapshot(step=500, steps=interval, layers=list(range(1, LAYERS + 1)), num_experts=E, ep_size=EP,
                    tokens_per_expert=tpe_l, step_tokens_per_expert=(tpe_l // interval).expand(interval, LAYERS, E),
                    source_expert_counts=source, locality=torch.zeros(LAYERS, 3, dtype=torch.long),
                    timing_ms={"dispatch_fwd": torch.rand(LAYERS), "combine_fwd": torch.rand(LAYERS)})
    return (len(encode_report(build_report(snap))) + 1) * math.ceil(ITERS / interval)

mb = lambda b: f"{b / 1e6:,.1f} MB"  # noqa: E731
print(f"RouterTracer: {trace_record / 1e3:,.0f} kB per record, {mb(trace)} per {ITERS} iterations")
print(f"save_tpe every iteration: {mb(tpe)}; every 100 iterations: {mb(tpe / 100)}")
for interval in (10, 100):
    print(f"probe, interval {interval}: {mb(probe_bytes(interval))} (intervals.jsonl)")
