"""The CPU demo (`moe-probe demo`): a real tiny MoE training run on CPU with the probe on.

Megatron-Core's GPTModel with MoE layers (8 experts, top-2, 2 layers), 2 processes
over gloo, expert parallelism 2 with the real alltoall token dispatcher, trained
with AdamW on byte-level text (the Python standard library's own source, so it
needs no download). The probe reports every `--interval` iterations to the local
store and the console (commands/demo.py prints the closing table and plot).

`--ranks 4|8` scans expert parallelism on CPU, `--dispatcher allgather` swaps the
dispatcher, and `--data mock|random` swaps the text for Megatron's own mock token
stream (MockGPTLowLevelDataset: ramps 1, 2, 3, ... ending in EOD) or uniform random
bytes, for mock-vs-real routing. Rank 0 writes every iteration's time and loss to
RUN/train.jsonl, which `moe-probe compare` reads like Megatron's log.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.record import LineLog, claim_run_folder, fresh_run_folder

# Text the demo trains on: real prose and code, shipped with every Python.
CORPUS_MODULES = ("argparse", "textwrap", "json.decoder", "pathlib", "logging", "dataclasses")
DATA_SOURCES = ("text", "mock", "random")
DISPATCHERS = ("alltoall", "allgather")  # the two that run on CPU (flex needs CUDA)
RANKS = (2, 4, 8)  # processes = EP degree, each holding --experts / ranks experts
TRAIN_LOG = "train.jsonl"
PLOT = "imbalance.png"
RUN_FILES = (TRAIN_LOG, PLOT, "tensorboard", "wandb")  # what the demo writes besides the probe's own files (record.RUN_FILES)


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

    from megatron_moe_probe.cpu import cluster as cc
    from megatron_moe_probe.session import open_session
    from megatron_moe_probe.settings import ProbeSettings

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = cc.TinyMoEConfig(ep=world, dispatcher=settings["dispatcher"], num_experts=settings["experts"],
                           micro_batch_size=settings["global_batch"] // world)
    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01)

    names = settings.get("writers") or (["local"] if settings["quiet"] else ["local", "console"])
    probe_settings = ProbeSettings.create(settings["interval"], writers=names, out_dir=settings["out"],
                                          gpus_per_node=world)
    meta = {"job": "demo", "model": cfg.__dict__ | {"extra": None}, "world_size": world,
            "dispatcher": settings["dispatcher"], "interval": settings["interval"], "data": settings["data"],
            "global_batch": settings["global_batch"]}
    # The run folder was claimed before the processes started (prepare_run_folder): used as is.
    session = open_session([model], probe_settings, run_meta=meta, writer=rank == world - 1)

    data = training_tokens(settings["data"], cfg.vocab_size)
    # As durable as the probe's records: a kill or a full disk loses at most the last line,
    # warns once, and never stops training (record.LineLog).
    train_log = LineLog(Path(settings["out"]) / TRAIN_LOG) if rank == 0 else None
    # Every rank draws the same global batch and trains on its slice: the tokens of a step do not
    # depend on how many ranks share them, so runs at different EP see the same data.
    g = torch.Generator().manual_seed(0)
    mine = slice(rank * cfg.micro_batch_size, (rank + 1) * cfg.micro_batch_size)
    losses, times = [], []
    try:
        for it in range(1, settings["steps"] + 1):
            t0 = time.perf_counter()
            starts = torch.randint(0, data.numel() - cfg.seq_length - 1, (settings["global_batch"],),
                                   generator=g)[mine]
            window = torch.stack([data[s : s + cfg.seq_length + 1] for s in starts.tolist()])
            optimizer.zero_grad(set_to_none=True)
            session.start_step()  # only this iteration's forward/backward counts
            loss = cc.forward_backward(model, window[:, :-1], labels=window[:, 1:])
            cc.allreduce_gradients(model)
            optimizer.step()
            session.after_step(it)
            losses.append(float(loss))
            times.append(time.perf_counter() - t0)
            if train_log:
                train_log.write({"iteration": it, "elapsed time per iteration (ms)": times[-1] * 1000,
                                 "lm loss": losses[-1]})
            if session.stop_requested is not None:  # same iteration on every rank (see session.py)
                break
        session.close(it)
    finally:
        if train_log:
            train_log.close()
    return {"losses": losses, "step_seconds": times}


def check_settings(steps: int, interval: int, ranks: int, experts: int, global_batch: int,
                   lr: float = 3e-3) -> None:
    """Every argument checked before a process starts (a mistake costs no training time)."""
    if steps < 1 or interval < 1:
        raise UsageError("--steps and --interval must be >= 1")
    if global_batch < ranks or global_batch % ranks:
        raise UsageError(f"--global-batch {global_batch} must be a multiple of --ranks {ranks}")
    if experts < ranks or experts % ranks:
        raise UsageError(f"--experts {experts} must be a multiple of --ranks {ranks} (each EP rank holds "
                         f"the same number of experts)")
    if not (lr > 0 and lr < float("inf")):  # AdamW's own check, made before ten seconds of start-up
        raise UsageError(f"--lr {lr:g}: the learning rate must be a positive number")


def prepare_run_folder(out: Path | None, overwrite: bool = False) -> Path:
    """The run folder, ready before any process starts: `out` (refused when it holds another
    run, unless `overwrite`), or a fresh runs/demo-<time>[-N] when `out` is None."""
    if out is None:
        try:
            return fresh_run_folder(Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S"))
        except OSError as exc:
            raise UsageError(f"cannot create a run folder under runs/: {exc.strerror or exc}") from None
    return claim_run_folder(out, files=RUN_FILES, overwrite=overwrite, flag="--out")


def train(out: Path, *, steps: int, interval: int, dispatcher: str, ranks: int, experts: int, data: str,
          global_batch: int, lr: float, quiet: bool, writers: list[str] | None = None) -> list[dict]:
    """Train on `ranks` CPU processes; one {"losses", "step_seconds"} per rank."""
    from megatron_moe_probe.cpu.cluster import run_ranks

    settings = dict(out=str(out), steps=steps, interval=interval, dispatcher=dispatcher, lr=lr, quiet=quiet,
                    experts=experts, data=data, global_batch=global_batch, writers=writers)
    return run_ranks(_rank_main, ranks, settings)
