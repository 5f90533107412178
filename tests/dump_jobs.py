"""Rank functions that make Megatron's own routing dumps on the CPU Megatron MoE (module level
so `spawn` can import them). Ground truth comes from the token dispatcher itself."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import megatron_jobs as jobs
from megatron_moe_probe.cpu import cluster as cc


def _moe_layers(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def _tpe_hooks(logger, model):
    """Megatron's own tokens-per-expert hooks (ActivationLogger._make_tpe_hook), on the experts
    module. Megatron registers them on TE's GroupedLinear `linear_fc1` only, which cannot run
    here (no transformer-engine on CPU); TEGroupedMLP calls linear_fc1(hidden, tokens_per_expert
    .tolist()), so the hook gets what it would get there: the local experts' counts as a list."""
    handles = []
    for name, layer in _moe_layers(model):
        hook = logger._make_tpe_hook("model_chunk0", f"{name}.experts.linear_fc1")

        def on_experts(module, args, kwargs, output, _hook=hook):
            _hook(module, (args[0], torch.as_tensor(args[1]).tolist()), kwargs, output)

        handles.append(layer.experts.register_forward_hook(on_experts, with_kwargs=True))
    return handles


def megatron_dumps(rank, world, cfg, trace_dir, save_dir, steps, micro_batches, eval_every, tpe_every):
    """Megatron's train_step order: forward/backward of every micro-batch, save_tpe(iteration + 1)
    when due, RouterTracer.advance_step(iteration); evaluation (forward only) between steps."""
    from megatron.core.transformer.moe.router_trace import RouterTracer
    from megatron.training.activation_logging import ActivationLogger

    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    tracer = RouterTracer(trace_dir, max_steps=steps, rank=rank, training_mode=True)
    tracer.register_hooks([model])
    logger = ActivationLogger(save_dir)
    layers = _moe_layers(model)
    truth = []  # per iteration: {layer number: {"per_local_expert": [...], "input_splits": [...]}}
    for iteration in range(steps):
        handles = _tpe_hooks(logger, model) if (iteration + 1) % tpe_every == 0 else []
        step_truth: dict = {}
        for mb in range(micro_batches):
            cc.forward_backward(model, jobs.batch(cfg, rank, iteration * micro_batches + mb))
            for _, layer in layers:
                t = jobs.dispatcher_truth(SimpleNamespace(dispatcher=layer.token_dispatcher))
                acc = step_truth.setdefault(layer.layer_number, {"per_local_expert": None, "input_splits": None})
                for key in ("per_local_expert", "input_splits"):
                    acc[key] = t[key] if acc[key] is None else [a + b for a, b in zip(acc[key], t[key])]
        if handles:
            logger.save_tpe(iteration + 1)
            for h in handles:
                h.remove()
        tracer.advance_step(iteration)
        truth.append(step_truth)
        if eval_every and (iteration + 1) % eval_every == 0 and iteration + 1 < steps:
            model.eval()
            with torch.no_grad():  # evaluation: RouterTracer's hooks fire here too
                cc.forward_backward(model, jobs.batch(cfg, rank, 10_000 + iteration), backward=False)
            model.train()
    tracer.flush()
    return {"truth": truth, "ep_rank": layers[0][1].token_dispatcher.ep_rank}
