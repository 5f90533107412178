"""A small real Megatron MoE GPT model on CPU, over gloo, in N local processes.

Used by the CPU demo and the tests: the model, the parallel state and the token
dispatchers are Megatron-Core's own; only CUDA plumbing is swapped out
(cpu/compat.py). `run_ranks(fn, world_size, ...)` starts the processes and returns
what `fn` returned on each rank.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class TinyMoEConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 128
    num_experts: int = 8
    topk: int = 2
    moe_ffn_hidden_size: int = 128
    vocab_size: int = 256
    seq_length: int = 64
    micro_batch_size: int = 2
    tp: int = 1
    ep: int = 2
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages per pipeline rank
    dispatcher: str = "alltoall"
    capacity_factor: float | None = None
    pad_to_capacity: bool = False
    shared_expert_size: int | None = None
    recompute: bool = False
    sequence_parallel: bool = False
    aux_loss_coeff: float = 1e-2
    moe_layer_freq: int | list[int] = 1
    seed: int = 1234
    extra: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes) -> "TinyMoEConfig":
        return replace(self, **changes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, conn, parent_pid: int) -> None:
    from megatron_moe_probe.lifetime import die_with_parent

    die_with_parent(parent_pid)  # a rank never outlives the process that started it (kill -9 included)
    from megatron_moe_probe.quiet import quiet_cpu_notices

    quiet_cpu_notices()
    try:
        # Megatron warns about every missing optional accelerator package; on CPU that is noise.
        warnings.filterwarnings("ignore")
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        )
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:
                pass
            dist.destroy_process_group()
        # Plain pickle copies tensor storage; multiprocessing's own pickler would share it through
        # file descriptors that vanish when this process exits.
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # report everything to the parent, which re-raises
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        conn.close()


class RankFailed(RuntimeError):
    """A rank raised (its traceback is the message) or died without a word (killed, out of memory)."""


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 600) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; return results by rank.

    `fn` must be importable (module level) and its result picklable. Each rank reports through
    a pipe of its own (no queue: no semaphores to leak when a run is stopped); a rank that dies
    without reporting is noticed at once, and the others are stopped. The ranks die with this
    process, whatever kills it (lifetime.die_with_parent).
    """
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs, conns = [], {}
    for r in range(world_size):
        reader, writer = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(r, world_size, port, fn, args, writer, os.getpid()))
        procs.append(p)
        conns[r] = (reader, writer)
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for p in procs:
            p.start()
        for _, writer in conns.values():
            writer.close()  # the child holds it now: EOF on the reader means the rank is gone
        waiting = {reader: r for r, (reader, _) in conns.items()}
        deadline = time.monotonic() + timeout
        while waiting and not errors:
            ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                errors.append(f"no result from rank(s) {sorted(waiting.values())} after {timeout:g} s")
                break
            for reader in ready:
                rank = waiting.pop(reader)
                try:
                    status, payload = pickle.loads(reader.recv_bytes())
                except (EOFError, OSError):
                    code = procs[rank].join(timeout=5) or procs[rank].exitcode
                    errors.append(f"rank {rank} died without a result (exit code {code})")
                    break
                if status == "ok":
                    results[rank] = payload
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
                    break
    finally:
        for p in procs:
            if p.pid is None:
                continue
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for reader, _ in conns.values():
            reader.close()
    if errors:
        raise RankFailed("\n".join(errors))
    return [results[r] for r in range(world_size)]


def init_parallel(cfg: TinyMoEConfig) -> None:
    """Megatron's parallel state for the current gloo world (call inside a rank)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mc_random

    from megatron_moe_probe.cpu import compat as cpu_compat

    cpu_compat.enable()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.vpp,
        expert_model_parallel_size=cfg.ep,
        create_gloo_process_groups=False,
    )
    torch.manual_seed(cfg.seed)
    mc_random.model_parallel_cuda_manual_seed(cfg.seed)


def transformer_config(cfg: TinyMoEConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_token_dispatcher_type=cfg.dispatcher,
        moe_router_load_balancing_type="aux_loss" if cfg.aux_loss_coeff else "none",
        moe_aux_loss_coeff=cfg.aux_loss_coeff,
        moe_expert_capacity_factor=cfg.capacity_factor,
        moe_pad_expert_input_to_capacity=cfg.pad_to_capacity,
        moe_shared_expert_intermediate_size=cfg.shared_expert_size,
        moe_layer_freq=cfg.moe_layer_freq,
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.vpp,
        expert_model_parallel_size=cfg.ep,
        sequence_parallel=cfg.sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bf16=False,
        add_bias_linear=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_dtype=torch.float32,
    )
    if cfg.num_experts is None:  # a dense model: Megatron rejects MoE settings without experts
        for key in [k for k in kwargs if k.startswith("moe_")]:
            del kwargs[key]
    if cfg.recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(cfg.extra)
    return TransformerConfig(**kwargs)


def build_model(cfg: TinyMoEConfig, vp_stage: int | None = None):
    """Megatron's GPTModel with MoE layers (local spec, no transformer-engine): this rank's
    pipeline stage (and virtual stage `vp_stage`, if any)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(cfg)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        position_embedding_type="rope",
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
    return model


def causal_mask(seq_length: int) -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True where attention is not allowed (Megatron's convention).
    Passed explicitly because Megatron's default mask is built on the CUDA device."""
    return torch.triu(torch.ones(seq_length, seq_length), diagonal=1).bool()[None, None]


def forward_backward(model, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                     backward: bool = True) -> torch.Tensor:
    """One micro-batch through Megatron's GPTModel: mean LM loss (+ aux losses via autograd)."""
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)
    labels = tokens if labels is None else labels
    loss = model(tokens, position_ids, causal_mask(s), labels=labels).float().mean()
    if backward:
        loss.backward()
    return loss.detach()


def allreduce_gradients(model) -> None:
    """Average gradients as Megatron's DDP would: dense parameters over the data-parallel
    group, expert parameters (allreduce=False) over the expert-data-parallel group."""
    from megatron.core import parallel_state as ps

    groups = {
        True: ps.get_data_parallel_group(with_context_parallel=True),
        False: ps.get_expert_data_parallel_group(),
    }
    for p in model.parameters():
        if p.grad is None:
            continue
        group = groups[getattr(p, "allreduce", True)]
        size = dist.get_world_size(group)
        if size > 1:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(size)
    # Sequence-parallel norms are replicated over TP but see only their shard: sum over TP.
    tp = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(tp) > 1:
        for p in model.parameters():
            if p.grad is not None and getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=tp)
