"""`moe-probe demo`: a real tiny MoE training run on CPU with the probe on.

Megatron-Core's GPTModel with MoE layers (8 experts, top-2, 2 layers), 2 processes
over gloo, expert parallelism 2 with the real alltoall token dispatcher, trained
with AdamW on byte-level text (the Python standard library's own source, so it
needs no download). The probe reports every `--interval` iterations to the local
store and the console; the run ends with a per-layer imbalance table and a plot.

`--ranks 4|8` scans expert parallelism on CPU, `--dispatcher allgather` swaps the
dispatcher, and `--data mock|random` swaps the text for Megatron's own mock token
stream (MockGPTLowLevelDataset: ramps 1, 2, 3, ... ending in EOD) or uniform random
bytes, for mock-vs-real routing. Rank 0 writes every iteration's time and loss to
RUN/train.jsonl, which `moe-probe compare` reads like Megatron's log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from megatron_moe_probe.errors import UsageError

# Text the demo trains on: real prose and code, shipped with every Python.
CORPUS_MODULES = ("argparse", "textwrap", "json.decoder", "pathlib", "logging", "dataclasses")
DATA_SOURCES = ("text", "mock", "random")
DISPATCHERS = ("alltoall", "allgather")  # the two that run on CPU (flex needs CUDA)
RANKS = (2, 4, 8)  # processes = EP degree, each holding --experts / ranks experts
TRAIN_LOG = "train.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=40, help="training iterations (default 40)")
    p.add_argument("--interval", type=int, default=10, help="iterations per probe report (default 10)")
    p.add_argument("--out", default=None, help="run folder (default runs/demo-<time>)")
    p.add_argument("--dispatcher", choices=DISPATCHERS, default="alltoall")
    p.add_argument("--ranks", type=int, default=2, choices=RANKS, help="processes = EP degree (default 2)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer, a multiple of --ranks (default 8)")
    p.add_argument("--data", choices=DATA_SOURCES, default="text",
                   help="text (stdlib source bytes, default), mock (Megatron's mock token stream), random bytes")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step over all ranks (default 4 per rank); fixed, it gives every EP "
                        "degree the same tokens each step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--quiet", action="store_true", help="no per-interval console table")
    p.add_argument("--writers", default=None,
                   help="comma list of local, tensorboard, wandb, console (default local, + console unless --quiet)")


def corpus_bytes() -> bytes:
    import importlib

    parts = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        parts.append(Path(module.__file__).read_bytes())
    return b"\n".join(parts)


def training_tokens(source: str, vocab_size: int):
    """The token stream the demo samples windows from: as many tokens as the text has."""
    import numpy
    import torch

    text = torch.frombuffer(bytearray(corpus_bytes()), dtype=torch.uint8).long()
    if source == "text":
        return text
    if source == "random":
        return torch.randint(0, vocab_size, (text.numel(),), generator=torch.Generator().manual_seed(0))
    from types import SimpleNamespace

    from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

    # Megatron's own --mock-data documents, concatenated as its GPTDataset would pack them.
    mock = MockGPTLowLevelDataset(SimpleNamespace(vocab_size=vocab_size, eod=vocab_size - 1))
    docs, total, i = [], 0, 0
    while total < text.numel():
        docs.append(mock[i])
        total, i = total + len(docs[-1]), i + 1
    return torch.from_numpy(numpy.concatenate(docs)[: text.numel()])


def _rank_main(rank: int, world: int, settings: dict) -> dict:
    import torch

    from megatron_moe_probe.megatron import cpu_cluster as cc
    from megatron_moe_probe.megatron.training import ProbeSession
    from megatron_moe_probe.writers.base import make_writers

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = cc.TinyMoEConfig(ep=world, dispatcher=settings["dispatcher"], num_experts=settings["experts"],
                           micro_batch_size=settings["global_batch"] // world)
    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01)

    writer_rank = world - 1
    names = settings.get("writers") or (["local"] if settings["quiet"] else ["local", "console"])
    meta = {"job": "demo", "model": cfg.__dict__ | {"extra": None}, "world_size": world,
            "dispatcher": settings["dispatcher"], "interval": settings["interval"], "data": settings["data"],
            "global_batch": settings["global_batch"]}
    writers = make_writers(names, settings["out"], meta, rank=0 if rank == writer_rank else 1)
    session = ProbeSession([model], interval=settings["interval"], writers=writers, gpus_per_node=world)

    data = training_tokens(settings["data"], cfg.vocab_size)
    train_log = open(Path(settings["out"]) / TRAIN_LOG, "w") if rank == 0 else None
    # Every rank draws the same global batch and trains on its slice: the tokens of a step do not
    # depend on how many ranks share them, so runs at different EP see the same data.
    g = torch.Generator().manual_seed(0)
    mine = slice(rank * cfg.micro_batch_size, (rank + 1) * cfg.micro_batch_size)
    losses, times = [], []
    for it in range(1, settings["steps"] + 1):
        t0 = time.perf_counter()
        starts = torch.randint(0, data.numel() - cfg.seq_length - 1, (settings["global_batch"],), generator=g)[mine]
        window = torch.stack([data[s : s + cfg.seq_length + 1] for s in starts.tolist()])
        optimizer.zero_grad(set_to_none=True)
        loss = cc.forward_backward(model, window[:, :-1], labels=window[:, 1:])
        cc.allreduce_gradients(model)
        optimizer.step()
        session.after_step(it)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if train_log:
            train_log.write(json.dumps({"iteration": it, "elapsed time per iteration (ms)": times[-1] * 1000,
                                        "lm loss": losses[-1]}) + "\n")
    session.close(settings["steps"])
    if train_log:
        train_log.close()
    return {"losses": losses, "step_seconds": times}


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.interval < 1:
        raise UsageError("--steps and --interval must be >= 1")
    if args.global_batch is None:
        args.global_batch = 4 * args.ranks
    if args.global_batch < args.ranks or args.global_batch % args.ranks:
        raise UsageError(f"--global-batch {args.global_batch} must be a multiple of --ranks {args.ranks}")
    if args.experts < args.ranks or args.experts % args.ranks:
        raise UsageError(f"--experts {args.experts} must be a multiple of --ranks {args.ranks} (each EP rank holds "
                         f"the same number of experts)")
    out = Path(args.out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S")))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_file = out / ".write_test"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write the run folder {out}: {exc}") from None

    from rich.console import Console

    from megatron_moe_probe.megatron.cpu_cluster import run_ranks

    # Logs and CI are not terminals; rich would squeeze the table to 80 columns there.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(f"[bold]moe-probe demo[/]: Megatron GPTModel, 2 MoE layers x {args.experts} experts (top-2), "
                  f"{args.ranks} CPU ranks over gloo, EP={args.ranks}, {args.dispatcher} dispatcher, "
                  f"{args.data} data, {args.steps} steps -> {out}")
    from megatron_moe_probe.writers.base import parse_writer_names

    t0 = time.perf_counter()
    settings = dict(out=str(out), steps=args.steps, interval=args.interval, dispatcher=args.dispatcher,
                    lr=args.lr, quiet=args.quiet, experts=args.experts, data=args.data,
                    global_batch=args.global_batch, writers=parse_writer_names(args.writers) if args.writers else None)
    results = run_ranks(_rank_main, args.ranks, settings)
    wall = time.perf_counter() - t0
    losses = results[0]["losses"]
    step_s = sorted(results[0]["step_seconds"])[len(losses) // 2]
    console.print(f"done in {wall:.1f} s (median step {step_s * 1000:.0f} ms); "
                  f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return final_report(out, console)


def final_report(out: Path, console) -> int:
    """Per-layer imbalance table over the whole run, read back from the local store, plus a plot."""
    from rich.table import Table

    from megatron_moe_probe.writers.local import load_run

    meta, reports = load_run(out)
    if not reports:
        console.print("[red]no probe reports were written[/]")
        return 1
    table = Table(title=f"Routing imbalance per layer, {len(reports)} intervals to iteration {reports[-1].step}")
    for col in ("layer", "tokens", "max/mean\nfirst→last", "max/mean\nworst step", "gini", "entropy",
                "dead", "EP rank\nmax/mean", "sent to\nother rank"):
        table.add_column(col, justify="right")
    for i, layer in enumerate(reports[-1].layers):
        first, last = reports[0].per_layer[i], reports[-1].per_layer[i]
        tokens = sum(r.per_layer[i]["tokens"] for r in reports)
        worst = max(r.per_layer[i]["max_over_mean_step_worst"] for r in reports)
        remote = last["intra_node_tokens"] + last["inter_node_tokens"]
        table.add_row(str(layer), f"{tokens:,.0f}", f"{first['max_over_mean']:.2f}→{last['max_over_mean']:.2f}",
                      f"{worst:.2f}", f"{last['gini']:.3f}", f"{last['entropy']:.3f}", f"{last['dead_experts']:.0f}",
                      f"{last['rank_max_over_mean']:.3f}", f"{remote / max(last['tokens'], 1):.0%}")
    console.print(table)
    plot = plot_run(out, reports)
    console.print(f"records: {out / 'intervals.jsonl'}" + (f"\nplot:    {plot}" if plot else ""))
    console.print(f"next:    {cli_command()} analyze {out}   (EP what-if, placement, all-to-all cost)")
    return 0


def cli_command() -> str:
    """How to call `moe-probe` from here: by name when PATH finds this environment's script
    (an activated venv), else by its path (`bash tools/bootstrap.sh demo` does not activate)."""
    import shutil

    script = Path(sys.executable).parent / "moe-probe"
    if not script.is_file():
        return f"{sys.executable} -m megatron_moe_probe.cli"
    if shutil.which("moe-probe") == str(script):
        return "moe-probe"
    return os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)


def plot_run(out: Path, reports) -> Path | None:
    """max/mean and Gini per layer over the run, and the last interval's per-expert load."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    steps = [r.step for r in reports]
    for i, layer in enumerate(reports[-1].layers):
        ax1.plot(steps, [r.per_layer[i]["max_over_mean"] for r in reports], marker="o", label=f"layer {layer}")
        ax2.plot(steps, [r.per_layer[i]["gini"] for r in reports], marker="o", label=f"layer {layer}")
    ax1.set(title="per-expert max/mean (interval)", xlabel="iteration")
    ax2.set(title="Gini of expert load", xlabel="iteration")
    ax1.legend()
    last = reports[-1]
    image = ax3.imshow(last.tokens_per_expert, aspect="auto", cmap="viridis")
    ax3.set(title=f"tokens per expert, iterations to {last.step}", xlabel="expert", ylabel="layer",
            yticks=range(len(last.layers)), yticklabels=[str(n) for n in last.layers])
    fig.colorbar(image, ax=ax3)
    path = out / "imbalance.png"
    fig.savefig(path, dpi=110)
    return path
