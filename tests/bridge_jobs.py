"""A rank function driving the probe's Bridge callback through Megatron-Bridge 0.6.2's own
CallbackManager / CallbackContext (loaded by path from the wheel), in the event order of
Bridge's train() (megatron/bridge/training/train.py), on the CPU Megatron MoE."""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import torch

import megatron_jobs as jobs
from megatron_moe_probe.cpu import cluster as cc


def load_bridge_callbacks(path: str):
    spec = importlib.util.spec_from_file_location("bridge_callbacks_0_6_2", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def bridge_loop(rank, world, cfg, callbacks_py, out_dir, train_iters, micro_batches, interval, eval_interval,
                save_interval):
    from megatron_moe_probe.megatron.bridge import MoEProbeCallback

    cb = load_bridge_callbacks(callbacks_py)
    cc.init_parallel(cfg)
    model = cc.build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    state = SimpleNamespace(
        train_state=SimpleNamespace(step=0),
        cfg=SimpleNamespace(checkpoint=SimpleNamespace(save=None), logger=SimpleNamespace(wandb_project=None),
                            train=SimpleNamespace(micro_batch_size=cfg.micro_batch_size),
                            model=SimpleNamespace(seq_length=cfg.seq_length)),
        tensorboard_logger=None, wandb_logger=None)
    probe = MoEProbeCallback(interval=interval, writers=["local"], out_dir=out_dir, gpus_per_node=1)
    broken = MoEProbeCallback(interval=interval, writers=["local"], out_dir=out_dir + "-broken")
    manager = cb.normalize_callbacks([probe])
    broken_manager = cb.CallbackManager()
    broken_manager.add(broken)

    def fire(event, **extra):
        if cb.should_fire(manager, event):
            manager.fire(event, cb.CallbackContext(state=state, model=[model], user_state=manager.user_state,
                                                   optimizer=optimizer, **extra))
        if cb.should_fire(broken_manager, event):  # a model without MoE layers: attach fails inside
            broken_manager.fire(event, cb.CallbackContext(state=state, model=[torch.nn.Linear(2, 2)]))

    fire("on_train_start")
    eval_passes = 0
    while state.train_state.step < train_iters:
        fire("on_train_step_start")
        optimizer.zero_grad()
        for mb in range(micro_batches):
            cc.forward_backward(model, jobs.batch(cfg, rank, state.train_state.step * micro_batches + mb))
        cc.allreduce_gradients(model)
        optimizer.step()
        fire("on_train_step_end", loss_dict={}, grad_norm=None, skipped_iter=False)
        state.train_state.step += 1
        if state.train_state.step % eval_interval == 0:  # evaluate_and_print_results: model.eval(), forward only
            fire("on_eval_start")
            model.eval()
            with torch.no_grad():
                cc.forward_backward(model, jobs.batch(cfg, rank, 50_000 + state.train_state.step), backward=False)
            model.train()
            eval_passes += 1
            fire("on_eval_end", total_loss_dict={})
        if state.train_state.step % save_interval == 0:  # save_checkpoint fires on_checkpoint_save
            fire("on_checkpoint_save")
    fire("on_train_end")
    return {"eval_passes": eval_passes, "broken_session": broken.session, "events": sorted(manager.events)
            if hasattr(manager, "events") else None}
