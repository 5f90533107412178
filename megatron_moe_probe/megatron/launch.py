"""The pretraining worker of `moe-probe train`: Megatron-Core 0.19 GPT/MoE pretraining with the probe on.

The megatron-core wheel has `megatron.training.pretrain` but not Megatron-LM's
pretrain_gpt.py; this module supplies what that script would:

    model_provider(pre_process, post_process, vp_stage=None, config=None, pg_collection=None)
    forward_step(data_iterator, model, return_schedule_plan=False) -> (output, partial(loss_func, loss_mask))
    train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None)
    main(argv)   the in-process entry each torchrun worker runs (`python -m megatron_moe_probe.megatron.launch`)

The torchrun command that starts these workers is built by torchrun.py.

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

import sys
from functools import partial
from typing import Optional

import torch

from megatron_moe_probe.megatron import flags, quirks, training

NO_CUDA = (
    "megatron.training.pretrain() needs CUDA GPUs, and this machine has none "
    "(torch.cuda.is_available() is False). `moe-probe train --dry-run ...` prints the command to run on "
    "a GPU machine; for the probe on a real Megatron MoE model on CPU, run `moe-probe demo`."
)

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


def get_batch(data_iterator, vp_stage: Optional[int] = None, dataset_ids: Optional[list] = None):
    """(tokens, labels, loss_mask, attention_mask, position_ids) for this rank.

    `dataset_ids`, a list, receives the micro-batch's dataset id per sample ([micro_batch]
    tensor: BlendedDataset's `dataset_id`, broadcast over the TP group like the batch) when
    the data has them, else None.

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
    ids = None
    if tp_rank == 0:
        raw = next(data_iterator)
        dev = _device()
        batch = {k: (raw[k].to(dev, non_blocking=True) if torch.is_tensor(raw.get(k)) else None) for k in BATCH_KEYS}
        batch["cu_seqlens"] = None
        if dataset_ids is not None and torch.is_tensor(raw.get("dataset_id")):
            ids = raw["dataset_id"].to(dev, torch.long, non_blocking=True)
    if dataset_ids is not None and mpu.get_tensor_model_parallel_world_size() > 1:
        # Every TP rank routes tokens with sequence parallelism: all need the ids. Shape is
        # fixed ([micro_batch]), so no host sync; -1 on rank 0 means "no ids in this data".
        if ids is None:
            ids = torch.full((args.micro_batch_size,), -1, dtype=torch.long, device=_device())
        torch.distributed.broadcast(ids, mpu.get_tensor_model_parallel_src_rank(),
                                    group=mpu.get_tensor_model_parallel_group())
    if dataset_ids is not None:
        dataset_ids.append(ids)
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
    from megatron.training import get_args, get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    session = training.current_session()
    wants_domains = session is not None and bool(session.domains)
    ids: Optional[list] = [] if wants_domains else None
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage, ids)
    if ids:  # the blend's dataset of each sample, for the probe's per-domain counts
        training.set_batch_domains(ids[0], get_args().seq_length)
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

    quirks.apply()
    training.install()  # wraps train_step / train / save_checkpoint_and_time before pretrain looks them up
    training.mark_forward_step_sets_domains()  # forward_step below hands the probe each batch's dataset ids
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


if __name__ == "__main__":
    sys.exit(main())
