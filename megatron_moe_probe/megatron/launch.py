"""`moe-probe train`: Megatron-Core 0.19 GPT/MoE pretraining with the probe on.

The megatron-core wheel has `megatron.training.pretrain` but not Megatron-LM's
pretrain_gpt.py; this module supplies what that script would:

    model_provider(pre_process, post_process, vp_stage=None, config=None, pg_collection=None)
    forward_step(data_iterator, model, return_schedule_plan=False) -> (output, partial(loss_func, loss_mask))
    train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None)
    main(argv)   the in-process entry each torchrun worker runs

and `run(args)`, the CLI: `moe-probe train RECIPE [--variant V] [--nproc-per-node N]
[--nnodes M --node-rank R --master-addr HOST] [--dry-run] [-- extra Megatron args]`, or
`moe-probe train -- RAW MEGATRON ARGS`. It always starts the workers through torchrun
(`python -m torch.distributed.run`), also for one GPU: Megatron reads RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and torchrun sets them all, picks a free port
(`--standalone`) and tears every worker down when one fails. When those variables are
already set (the command runs inside torchrun/srun), it trains in-process instead.

Calling convention of megatron-core 0.19 (training/training.py):
- `pretrain(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
  model_provider=None, ...)`: the config container comes first and the model provider is a
  keyword after forward_step (the pre-0.18 positional order was dataset, model, type, forward).
- `pretrain` does not parse arguments: `initialize_megatron()` reads the global args that
  `parse_and_validate_args()` set, so parsing happens here first, with the probe's flags.
- `get_model` calls `model_provider_func(pre_process=, post_process=, config=, pg_collection=)`
  and adds `vp_stage=` with virtual pipeline stages.
- The loss function returns `(loss_sum, num_tokens, {"lm loss": tensor([loss_sum, num_tokens])})`:
  schedules.forward_step_calc_loss divides by num_tokens (and by the number of micro-batches)
  unless --calculate-per-token-loss; train_step sums two-element report values over micro-batches
  and data-parallel ranks and logs sum/count.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys
from functools import partial
from typing import Optional

import torch

from megatron_moe_probe.cli import args_after_dashdash
from megatron_moe_probe.errors import UsageError

NO_CUDA = (
    "megatron.training.pretrain() needs CUDA GPUs, and this machine has none "
    "(torch.cuda.is_available() is False). `moe-probe train --dry-run ...` prints the command to run on "
    "a GPU machine; for the probe on a real Megatron MoE model on CPU, run `moe-probe demo`."
)

LAUNCH_MODULE = "megatron_moe_probe.megatron.launch"


# -- the probe's own Megatron pieces (written alongside this module) ---------------------------

def _probe_integration():
    """megatron_moe_probe.megatron.training (install) and .flags (add_probe_args), or a clear error."""
    try:
        training = importlib.import_module("megatron_moe_probe.megatron.training")
        flags = importlib.import_module("megatron_moe_probe.megatron.flags")
    except ImportError as exc:
        raise RuntimeError(
            f"moe-probe train needs megatron_moe_probe.megatron.training and .flags (the probe's "
            f"train_step hooks and --moe-probe* flags), which failed to import: {exc}"
        ) from exc
    for module, name in ((training, "install"), (flags, "add_probe_args")):
        if not callable(getattr(module, name, None)):
            raise RuntimeError(f"{module.__name__}.{name} is missing: this checkout of megatron_moe_probe is incomplete")
    return training, flags


# -- model ----------------------------------------------------------------------------------------

def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def layer_spec(args, config, vp_stage: Optional[int] = None):
    """The decoder spec for Megatron's args: MoE block spec, experimental attention, or dense."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    use_te = args.transformer_impl == "transformer_engine"
    if use_te and not _have_transformer_engine():
        raise RuntimeError("--transformer-impl transformer_engine, but transformer-engine is not installed; "
                           "install it or pass --transformer-impl local")
    if getattr(args, "spec", None):
        from megatron.core.transformer.spec_utils import import_module

        return import_module(args.spec)
    if getattr(args, "experimental_attention_variant", None) is not None:
        from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
            get_transformer_block_with_experimental_attention_variant_spec,
        )

        return get_transformer_block_with_experimental_attention_variant_spec(config=config, vp_stage=vp_stage)
    if args.num_experts:
        # Per-layer dense/MoE specs (--moe-layer-freq), sliced to this pipeline stage.
        return get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=args.normalization,
                                          qk_l2_norm=args.qk_l2_norm, vp_stage=vp_stage)
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(None, args.moe_grouped_gemm, args.qk_layernorm,
                                                          args.multi_latent_attention, qk_l2_norm=args.qk_l2_norm)
    return get_gpt_layer_local_spec(None, args.moe_grouped_gemm, args.qk_layernorm, args.multi_latent_attention,
                                    normalization=args.normalization, qk_l2_norm=args.qk_l2_norm)


def _mtp_spec(args, config, spec, vp_stage):
    if not getattr(args, "mtp_num_layers", None):
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs, get_gpt_mtp_block_spec

    use_te = args.transformer_impl == "transformer_engine"
    # MTP layers repeat the decoder's last layer.
    last = get_gpt_decoder_layer_specs(config, use_transformer_engine=use_te, normalization=args.normalization,
                                       qk_l2_norm=args.qk_l2_norm, vp_stage=vp_stage)[-1]
    return get_gpt_mtp_block_spec(config, last, use_transformer_engine=use_te, vp_stage=vp_stage)


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None):
    """Megatron-Core's GPTModel for the global args (the 0.19 model-provider signature)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training import get_args, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    print_rank_0("moe-probe: building GPT model ...")
    if config is None:
        config = core_transformer_config_from_args(args)
    spec = layer_spec(args, config, vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        mtp_block_spec=_mtp_spec(args, config, spec, vp_stage),
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


# -- batches, loss, forward step ------------------------------------------------------------------

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")  # CPU tests only; pretrain() itself needs CUDA


def get_batch(data_iterator, vp_stage: Optional[int] = None):
    """(tokens, labels, loss_mask, attention_mask, position_ids) for this rank.

    TP rank 0 reads the data loader and broadcasts to its TP group (Megatron's own
    get_batch_on_this_tp_rank); the sequence is then sliced for context parallelism.
    Middle pipeline stages get Nones (they take activations, not tokens)."""
    from megatron.core import mpu
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None, None
    args = get_args()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch: dict = {}
    if tp_rank == 0:
        raw = next(data_iterator)
        dev = _device()
        batch = {k: (raw[k].to(dev, non_blocking=True) if torch.is_tensor(raw.get(k)) else None) for k in BATCH_KEYS}
        batch["cu_seqlens"] = None
    if mpu.get_tensor_model_parallel_world_size() > 1:
        batch = get_batch_on_this_tp_rank(
            batch,
            has_cu_seqlens=False,
            is_hybrid_cp=False,
            create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
            broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
            broadcast_group=mpu.get_tensor_model_parallel_group(),
            cp_size=args.context_parallel_size,
            tp_rank=tp_rank,
            micro_batch_size=args.micro_batch_size,
            seq_length=args.seq_length,
            mtp_on_this_rank=bool(getattr(args, "mtp_num_layers", None)),
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
            is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
        )
    if args.context_parallel_size > 1:
        batch.setdefault("cu_seqlens", None)
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group())
    return tuple(batch.get(k) for k in BATCH_KEYS)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked LM loss in 0.19's three-value form: (sum, token count, report).

    The schedule divides the sum by the token count (and the micro-batch count); the
    report's [sum, count] pair is summed over micro-batches and data-parallel ranks
    before Megatron logs `lm loss` = sum / count."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    if get_args().check_for_nan_in_loss_and_grad:
        rsm = get_rerun_state_machine()
        rsm.validate_result(result=loss, rejection_func=torch.isnan, message="found NaN in local forward loss calculation",
                            tolerance=0.0, fatal=True)
        rsm.validate_result(result=loss, rejection_func=torch.isinf, message="found Inf in local forward loss calculation",
                            tolerance=0.0, fatal=True)
    return loss, num_tokens, report


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch forward: `(output_tensor, partial(loss_func, loss_mask))`.

    `return_schedule_plan` is what 0.19's combined 1F1B schedule asks for with
    --overlap-moe-expert-parallel-comm (combined_1f1b.py)."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()
    if return_schedule_plan:
        plan = model.build_schedule_plan(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
        return plan, partial(loss_func, loss_mask)
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


# -- datasets -------------------------------------------------------------------------------------

def gpt_dataset_config_from_args(args, tokenizer=None):
    """GPTDatasetConfig from Megatron's args (mock data or --data-path / per-split paths)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    kwargs = dict(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        tokenizer=tokenizer if tokenizer is not None else get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    # Optional knobs: passed when this Megatron has both the flag and the config field.
    optional = {
        "multiple_validation_sets": "multiple_validation_sets", "full_validation": "full_validation",
        "num_dataset_builder_threads": "num_dataset_builder_threads", "path_to_cache": "data_cache_path",
        "mmap_bin_files": "mmap_bin_files", "object_storage_cache_path": "object_storage_cache_path",
        "mid_level_dataset_surplus": "mid_level_dataset_surplus",
        "allow_ambiguous_pad_tokens": "allow_ambiguous_pad_tokens", "fast_cache_load": "dataloader_fast_cache_load",
        "defer_npy_index_mmap": "dataloader_defer_npy_index_mmap",
    }
    fields = GPTDatasetConfig.__dataclass_fields__
    for field, attr in optional.items():
        if field in fields and getattr(args, attr, None) is not None:
            kwargs[field] = getattr(args, attr)
    return GPTDatasetConfig(**kwargs)


def is_dataset_built_on_rank(vp_stage: Optional[int] = None) -> bool:
    from megatron.core import mpu
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return is_first_or_last_pipeline_stage(vp_stage) and mpu.get_tensor_model_parallel_rank() == 0


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage: Optional[int] = None):
    """MockGPTDataset for --mock-data, GPTDataset for --data-path (.bin/.idx), through
    Megatron's BlendedMegatronDatasetBuilder."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    args = get_args()
    config = gpt_dataset_config_from_args(args)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"moe-probe: building {dataset_type.__name__} train/valid/test datasets ...")
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, partial(is_dataset_built_on_rank, vp_stage=vp_stage), config
    ).build()


# Core datasets coordinate their own building across ranks (pretrain_gpt.py sets the same).
train_valid_test_datasets_provider.is_distributed = True


# -- in-process entry -----------------------------------------------------------------------------

UNSUPPORTED = {
    "sft": "--sft (use Megatron-LM's pretrain_gpt.py with `python -m megatron_moe_probe.megatron.training`)",
    "dataloader_inter_document_masking": "--dataloader-inter-document-masking",
    "hybrid_context_parallel": "--hybrid-context-parallel",
    "fim_data": "--fim-data",
}


def parse_megatron_args(argv: list[str]):
    """Megatron's own parse_and_validate_args over argv, with the probe's flags. Sets Megatron's
    global args (and tokenizer, timers); raises SystemExit on a bad flag, as Megatron does."""
    from megatron.training.arguments import parse_and_validate_args

    _, flags = _probe_integration()
    saved = sys.argv
    sys.argv = [sys.argv[0] if sys.argv else "moe-probe-train", *argv]  # Megatron parses sys.argv
    try:
        args = parse_and_validate_args(extra_args_provider=flags.add_probe_args)
    finally:
        sys.argv = saved
    bad = [flag for attr, flag in UNSUPPORTED.items() if getattr(args, attr, False)]
    if bad:
        raise SystemExit(f"moe-probe train: not supported by this launcher's forward_step: {', '.join(bad)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """What each torchrun worker runs: quirks, probe hooks, Megatron args, pretrain()."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print(f"moe-probe train: error: {NO_CUDA}", file=sys.stderr)
        return 2
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_moe_probe.megatron import quirks

    quirks.apply()
    training, _ = _probe_integration()
    training.install()  # wraps train_step / train / save_checkpoint_and_time before pretrain looks them up
    args = parse_megatron_args(argv)
    cfg = pretrain_cfg_container_from_args(args)
    pretrain(
        cfg,
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )
    return 0


# -- the CLI: torchrun command --------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = ("moe-probe train [RECIPE[:VARIANT]] [--variant V] [--nproc-per-node N] [--nnodes M --node-rank R "
               "--master-addr HOST [--master-port P]] [--dry-run] [-- MEGATRON ARGS...]")
    p.description = ("Megatron-Core pretraining (GPT/MoE) with the probe on, through torchrun. Give a recipe "
                     "(rendered with its --moe-probe* flags; Megatron args after -- are appended and win), or "
                     "only raw Megatron args after --.")
    p.add_argument("recipe", nargs="?", help="recipe NAME, NAME:VARIANT or a path to a recipe .yaml")
    p.add_argument("--variant", default=None, help="recipe variant (same as NAME:VARIANT)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="GPUs (processes) per node; default: the recipe's gpus_per_node, else 1")
    p.add_argument("--nnodes", type=int, default=None, help="nodes; default: the recipe's nodes, else 1")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (multi-node)")
    p.add_argument("--master-addr", default=None, help="node 0's address (multi-node)")
    p.add_argument("--master-port", type=int, default=29500, help="node 0's port (multi-node; default 29500)")
    p.add_argument("--no-probe", action="store_true", help="leave out the recipe's --moe-probe* flags")
    p.add_argument("--dispatcher", default=None, metavar="BACKEND",
                   help="force the recipe's dispatcher (alltoall, allgather, deepep, hybridep, ncclep): one A/B cell")
    p.add_argument("--assume-installed", default=None, metavar="LIST",
                   help="resolve the recipe's `auto` dispatcher for another machine: comma list "
                        "(deepep,hybridep,ncclep,permute-fusion), 'all' or 'none'; default: probe this machine")
    p.add_argument("--data-path", nargs="+", default=None, metavar="PREFIX",
                   help="train the recipe on these indexed datasets (.bin/.idx prefixes, e.g. from "
                        "`moe-probe build-dataset`) instead of its own data, all of it for training")
    p.add_argument("--dry-run", action="store_true", help="print the exact command (and environment) and exit")
    p.parse_args = args_after_dashdash(p.parse_args)


def megatron_args_for(args: argparse.Namespace) -> tuple[list[str], dict[str, str], Optional[int], list[str]]:
    """(Megatron args, extra environment, recipe world size or None, notes) for the CLI args."""
    from megatron_moe_probe import recipes

    extra = list(getattr(args, "megatron_args", []) or [])
    data_path = getattr(args, "data_path", None)
    if args.recipe is None:
        if args.variant or data_path:
            raise UsageError("--variant and --data-path need a recipe (with raw args, give Megatron's own --data-path)")
        if not extra:
            raise UsageError("name a recipe (moe-probe render --list) or give Megatron args after --")
        return extra, {}, None, []
    spec = args.recipe
    if args.variant:
        if ":" in spec and not os.path.exists(spec):
            raise UsageError(f"give the variant once: {spec!r} and --variant {args.variant!r}")
        spec = f"{spec}:{args.variant}"
    r = recipes.load_recipe(spec)
    if getattr(args, "dispatcher", None):
        r = recipes.with_dispatcher(r, args.dispatcher)
    if data_path:
        from megatron_moe_probe.megatron.data import require_dataset

        for prefix in data_path:
            require_dataset(prefix, "--data-path", "build one with `moe-probe build-dataset`")
        data = r.data.model_copy(update={"source": "path", "paths": list(data_path), "split": "100,0,0"})
        r = r.model_copy(update={"data": data})
    availability = None
    if getattr(args, "assume_installed", None) is not None:
        from megatron_moe_probe.selection.availability import assumed, parse_backend_list
        from megatron_moe_probe.selection.card import default_card

        availability = assumed(default_card(), parse_backend_list(args.assume_installed))
    resolved = recipes.resolve_dispatcher(r, availability)
    margs = recipes.render(r, resolved=resolved)
    if not args.no_probe:
        margs += recipes.probe_args(r)
    return margs + extra, dict(resolved.env), r.parallelism.world_size, list(resolved.notes)


def build_command(args: argparse.Namespace, megatron_args: list[str]) -> tuple[list[str], int, int]:
    from megatron_moe_probe import recipes

    nnodes = args.nnodes
    nproc = args.nproc_per_node
    if args.recipe is not None and (nnodes is None or nproc is None):
        spec = f"{args.recipe}:{args.variant}" if args.variant else args.recipe
        par = recipes.load_recipe(spec).parallelism
        nnodes = par.nodes if nnodes is None else nnodes
        nproc = par.gpus_per_node if nproc is None else nproc
    nnodes, nproc = nnodes or 1, nproc or 1
    if nproc < 1 or nnodes < 1:
        raise UsageError("--nproc-per-node and --nnodes must be at least 1")
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        torchrun += ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc)]
    else:
        if args.master_addr is None or args.node_rank is None:
            raise UsageError(f"--nnodes {nnodes} needs --master-addr (node 0's address) and --node-rank (this node's rank)")
        if not 0 <= args.node_rank < nnodes:
            raise UsageError(f"--node-rank {args.node_rank} is outside 0..{nnodes - 1}")
        torchrun += ["--nnodes", str(nnodes), "--node-rank", str(args.node_rank), "--master-addr", args.master_addr,
                     "--master-port", str(args.master_port), "--nproc-per-node", str(nproc)]
    return torchrun + ["-m", LAUNCH_MODULE, *megatron_args], nproc, nnodes


def _inside_launcher() -> bool:
    """RANK/WORLD_SIZE/MASTER_ADDR already set: torchrun, srun wrappers or mpirun started us."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def format_command(cmd: list[str], env: dict[str, str]) -> str:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(" ".join(shlex.quote(c) for c in cmd))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    megatron_args, env, recipe_world, notes = megatron_args_for(args)
    cmd, nproc, nnodes = build_command(args, megatron_args)
    world = nproc * nnodes
    if recipe_world is not None and world != recipe_world:
        notes.append(f"warning: the recipe is laid out for {recipe_world} GPU(s), launching {world}; "
                     "Megatron re-derives data parallelism and checks the batch sizes")
    if args.dry_run:
        print(f"# torchrun (python -m torch.distributed.run): {nproc} process(es) per node x {nnodes} node(s)")
        for n in notes:
            print(f"# {n}")
        print(format_command(cmd, env))
        return 0
    for n in notes:
        print(f"moe-probe train: {n}", file=sys.stderr)
    if not torch.cuda.is_available():
        raise UsageError(NO_CUDA)
    if _inside_launcher():
        os.environ.update(env)
        return main(megatron_args)
    have = torch.cuda.device_count()
    if nproc > have:
        raise UsageError(f"--nproc-per-node {nproc} but this node has {have} GPU(s)")
    child_env = {**os.environ, **env}
    print(f"moe-probe train: {format_command(cmd, env)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=child_env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group): let it clean up
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
