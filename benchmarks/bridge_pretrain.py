"""MoEProbeCallback inside Megatron-Bridge's own `pretrain()`, on one GPU.

    torchrun --standalone --nproc-per-node 1 benchmarks/bridge_pretrain.py --out DIR [--iters 20]

Bridge's OLMoE recipe (`recipes.olmoe.h100.olmoe_7b_pretrain_8gpu_h100_bf16_config`, the MoE recipe of Bridge 0.6.2
that builds its model provider without a Hugging Face download) is shrunk to one GPU and a
small model, trained on Bridge's mock data with `pretrain(cfg, forward_step, callbacks=[probe])`,
and then checked:
  - every record of the run folder holds exactly `steps x global batch x sequence x top-k`
    router assignments per layer (the configuration's numbers, not the probe's), and the
    records cover iterations 1..N once (evaluation every `eval_interval` is not counted);
  - the probe's TensorBoard and wandb writers log into the SummaryWriter and the wandb module
    that Bridge's `GlobalState` made (object identity), and Bridge's event file and its one
    offline wandb run hold the probe's keys next to Bridge's own ("lm loss").
The result is DIR/result.json; the exit status is 0 only when every check holds.

What this script does to Bridge 0.6.2 to get there (all before `import megatron.bridge`):
  - `megatron.bridge.peft.lora_layers` imports transformer_engine at module level, and every
    recipe imports it (recipes/common.py -> peft.lora -> lora_layers). Transformer Engine is
    not on the GPU image (a 276 MB wheel and a 2-minute build). The module is replaced by one
    whose classes raise when built; pre-training with `peft=None` never builds them.
The environment: `nvidia_resiliency_ext` 0.4.1 (the newest on PyPI) must be installed without
its `checkpointing` package, else megatron-core 0.19.2's import fails (it reads
`nvidia_resiliency_ext.__version__`, which 0.4.1 lacks, and wants >= 0.6.0).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import types


def _lora_layers_without_te() -> None:
    name = "megatron.bridge.peft.lora_layers"

    class _NeedsTransformerEngine:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"{type(self).__name__}: LoRA layers need transformer_engine (not installed)")

    module = types.ModuleType(name)

    def __getattr__(attr):  # any class the PEFT modules import by name
        if attr.startswith("__"):
            raise AttributeError(attr)
        cls = type(attr, (_NeedsTransformerEngine,), {})
        setattr(module, attr, cls)
        return cls

    module.__getattr__ = __getattr__
    sys.modules[name] = module


def _prebuilt_dataset_helpers() -> None:
    """Bridge's initialize_megatron always runs megatron-core's compile_helpers(), a `make` in the
    package folder; the megatron-core wheel ships the helpers prebuilt (helpers_cpp) and no Makefile,
    so the make fails and Bridge exits. Where the prebuilt module imports, skip the build."""
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError:
        return
    import megatron.bridge.training.initialize as bridge_init

    bridge_init.compile_helpers = lambda: None


def build_config(out: str, iters: int, eval_interval: int):
    """Bridge's OLMoE pre-training recipe, shrunk to one GPU and a model that starts in seconds."""
    import torch
    from megatron.bridge.recipes.olmoe.h100.olmoe_7b import olmoe_7b_pretrain_8gpu_h100_bf16_config

    cfg = olmoe_7b_pretrain_8gpu_h100_bf16_config()
    m = cfg.model
    # One GPU: no expert, tensor or pipeline parallelism.
    m.expert_model_parallel_size = m.tensor_model_parallel_size = m.pipeline_model_parallel_size = 1
    m.pipeline_model_parallel_layout = None
    # A small OLMoE: 2 layers, 16 experts top-4 (the recipe: 16 layers, 64 experts top-8).
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 2, 256, 512
    m.num_attention_heads, m.num_query_groups, m.kv_channels = 4, 4, 64
    m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size = 16, 4, 256
    m.vocab_size, m.seq_length, m.max_position_embeddings = 1024, 256, 256
    # No Transformer Engine on the machine: Megatron's local layers and plain kernels.
    m.transformer_impl = "local"
    from megatron.bridge.models.gpt_provider import local_layer_spec

    m.transformer_layer_spec = local_layer_spec  # the provider's default asks for TE's layer spec
    m.moe_grouped_gemm = m.moe_permute_fusion = m.moe_router_fusion = False
    m.cross_entropy_loss_fusion = False
    m.gradient_accumulation_fusion = False
    m.masked_softmax_fusion = m.bias_activation_fusion = m.bias_dropout_fusion = m.persist_layer_norm = False
    m.apply_rope_fusion = False
    m.recompute_granularity = m.recompute_modules = m.recompute_method = None
    m.moe_token_dispatcher_type = "alltoall"
    cfg.tokenizer.vocab_size = m.vocab_size
    cfg.dataset.seq_length = m.seq_length
    cfg.dataset.num_workers = 1
    cfg.optimizer.use_precision_aware_optimizer = False  # needs TE's FusedAdam
    cfg.optimizer.main_grads_dtype = cfg.optimizer.exp_avg_dtype = cfg.optimizer.exp_avg_sq_dtype = torch.float32
    cfg.ddp.overlap_grad_reduce = cfg.ddp.overlap_param_gather = False
    cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.micro_batch_size = iters, 8, 2
    cfg.train.manual_gc = False
    cfg.validation.eval_interval, cfg.validation.eval_iters = eval_interval, 2
    cfg.scheduler.lr_warmup_iters, cfg.scheduler.lr_decay_iters = 2, iters
    cfg.checkpoint.save = cfg.checkpoint.load = None
    cfg.checkpoint.save_interval = None
    cfg.logger.log_interval = 5
    cfg.logger.tensorboard_dir = os.path.join(out, "tensorboard")
    cfg.logger.wandb_project, cfg.logger.wandb_exp_name = "moe-probe-bridge", "olmoe-tiny"
    cfg.logger.wandb_save_dir = os.path.join(out, "wandb")
    return cfg


class Observer:
    """A second callback: keeps Bridge's GlobalState and the probe's writers for the checks."""

    def __init__(self, probe):
        self.probe, self.state, self.writers, self.eval_runs = probe, None, None, 0

    def on_train_step_end(self, context):
        if self.state is None:
            self.state = context.state
            self.writers = list(self.probe.session.writers) if self.probe.session is not None else []

    def on_eval_end(self, context):
        self.eval_runs += 1


def check_records(run_dir: str, iters: int, tokens_per_iteration: int) -> list[str]:
    from megatron_moe_probe.record import load_run

    _, reports = load_run(run_dir)
    problems, previous = [], 0
    if not reports:
        return ["the probe wrote no record"]
    for r in reports:
        if r.steps != r.step - previous:
            problems.append(f"record {r.step}: steps {r.steps}, expected {r.step - previous}")
        for layer, counts in zip(r.layers, r.tokens_per_expert):
            want = r.steps * tokens_per_iteration
            if sum(counts) != want:
                problems.append(f"record {r.step} layer {layer}: {sum(counts)} != {r.steps} x {tokens_per_iteration}")
        previous = r.step
    if previous != iters:
        problems.append(f"the last record is iteration {previous}, training ran {iters}")
    return problems


def check_loggers(observer: Observer, out: str) -> tuple[dict, list[str]]:
    problems, seen = [], {}
    state = observer.state
    by_name = {type(w).__name__: w for w in observer.writers or []}
    tb, wb = by_name.get("TensorBoardWriter"), by_name.get("WandbWriter")
    seen["probe_writers"] = sorted(by_name)
    seen["tensorboard_is_bridges"] = tb is not None and tb._tb is state.tensorboard_logger and not tb._owned
    bridge_run = getattr(state.wandb_logger, "run", None)
    seen["wandb_is_bridges"] = wb is not None and wb._run is bridge_run and not wb._owned
    for key in ("tensorboard_is_bridges", "wandb_is_bridges"):
        if not seen[key]:
            problems.append(f"{key}: False")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    seen["tensorboard_event_files"] = len(events)
    tags = set()
    for path in events:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags().get("scalars", []))
    seen["tensorboard_probe_tags"] = sorted(t for t in tags if t.startswith("moe/"))[:6]
    seen["tensorboard_has_lm_loss"] = any("lm loss" in t for t in tags)
    if len(events) != 1 or not seen["tensorboard_probe_tags"] or not seen["tensorboard_has_lm_loss"]:
        problems.append("Bridge's TensorBoard event file should hold both 'lm loss' and moe/* tags")
    runs = glob.glob(os.path.join(out, "wandb", "wandb", "offline-run-*", "run-*.wandb"))
    seen["wandb_offline_runs"] = len(runs)
    blob = open(runs[0], "rb").read() if runs else b""
    seen["wandb_run_has_probe_keys"] = b"moe/all/" in blob
    seen["wandb_run_has_lm_loss"] = b"lm loss" in blob
    if len(runs) != 1 or not seen["wandb_run_has_probe_keys"] or not seen["wandb_run_has_lm_loss"]:
        problems.append("Bridge's one offline wandb run should hold both 'lm loss' and moe/* keys")
    return seen, problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--eval-interval", type=int, default=10)
    opts = p.parse_args(argv)
    out = os.path.abspath(opts.out)
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")

    _lora_layers_without_te()
    _prebuilt_dataset_helpers()
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    from megatron_moe_probe.megatron.bridge import MoEProbeCallback

    cfg = build_config(out, opts.iters, opts.eval_interval)
    run_dir = os.path.join(out, "probe_run")
    probe = MoEProbeCallback(interval=opts.interval, writers=["local", "tensorboard", "wandb"], out_dir=run_dir)
    observer = Observer(probe)
    pretrain(cfg, forward_step, callbacks=[probe, observer])

    m, t = cfg.model, cfg.train
    tokens_per_iteration = t.global_batch_size * m.seq_length * m.moe_router_topk
    problems = check_records(run_dir, opts.iters, tokens_per_iteration)
    loggers, logger_problems = check_loggers(observer, out)
    from megatron_moe_probe.record import load_run

    _, reports = load_run(run_dir)
    result = {
        "recipe": "megatron.bridge.recipes.olmoe.h100.olmoe_7b.olmoe_7b_pretrain_8gpu_h100_bf16_config (shrunk)",
        "model": {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_moe_experts": m.num_moe_experts,
                  "moe_router_topk": m.moe_router_topk, "dispatcher": m.moe_token_dispatcher_type},
        "train": {"iters": opts.iters, "global_batch_size": t.global_batch_size, "seq_length": m.seq_length,
                  "eval_interval": opts.eval_interval, "eval_runs_seen": observer.eval_runs},
        "tokens_per_iteration_per_layer": tokens_per_iteration,
        "records": [{"step": r.step, "steps": r.steps, "assignments_per_layer": [sum(c) for c in r.tokens_per_expert]}
                    for r in reports],
        "loggers": loggers,
        "problems": problems + logger_problems,
    }
    result["status"] = "OK" if not result["problems"] else "FAILED"
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0 if result["status"] == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
