"""Megatron-LM's own training loop on CPU: `megatron.training.training.train` -> `train_step`.

The probe is installed the documented way (`training.install()` + the flags through
Megatron's parser), and Megatron's real `train()` drives everything: its
`train_step`, the no-pipelining schedule, its DDP and optimizer, evaluation every
`--eval-interval`, the rerun state machine. What `pretrain()` would do before
`train()` (it needs CUDA) is done here by hand: parse and validate the arguments,
set Megatron's globals, build the parallel state, model, DDP wrapper, optimizer
and scheduler. A resume is what `load_checkpoint` leaves behind: `args.iteration`
set to the checkpoint's iteration.

CPU-only stand-ins, beyond cpu.compat: tensor factories that Megatron 0.19 pins to
`device="cuda"` (the schedule's token counter, FP32Optimizer's scale) are sent to
the CPU by a TorchFunctionMode, memory statistics read 0, and gradient clipping
is off (clip_grads asserts CUDA tensors).
"""

from __future__ import annotations

import sys

import torch

from megatron_moe_probe.cpu import cluster as cc

GRAD_ACC = 2  # micro-batches per iteration and data-parallel rank


def tokens_per_iteration(cfg, world: int) -> int:
    """Router assignments per layer per iteration: global batch x sequence x top-k."""
    return cfg.micro_batch_size * GRAD_ACC * world * cfg.seq_length * cfg.topk


def _cuda_tensors_to_cpu():
    from torch.overrides import TorchFunctionMode

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.cuda:
                return args[0]
            device = kwargs.get("device")
            if device is not None and (device == "cuda" or isinstance(device, int)
                                       or (isinstance(device, torch.device) and device.type == "cuda")):
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    CudaToCpu().__enter__()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    # The rerun state machine saves and restores the CUDA RNG around a re-run.
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda *a, **k: None


def megatron_argv(cfg, world: int, out_dir: str, train_iters: int, interval: int, extra=()) -> list[str]:
    return [
        "pretrain_gpt.py", "--num-layers", str(cfg.num_layers), "--hidden-size", str(cfg.hidden_size),
        "--num-attention-heads", str(cfg.num_attention_heads), "--ffn-hidden-size", str(cfg.ffn_hidden_size),
        "--num-experts", str(cfg.num_experts), "--moe-router-topk", str(cfg.topk),
        "--moe-ffn-hidden-size", str(cfg.moe_ffn_hidden_size), "--expert-model-parallel-size", str(cfg.ep),
        "--moe-token-dispatcher-type", cfg.dispatcher, "--seq-length", str(cfg.seq_length),
        "--max-position-embeddings", str(cfg.seq_length), "--micro-batch-size", str(cfg.micro_batch_size),
        "--global-batch-size", str(cfg.micro_batch_size * GRAD_ACC * world), "--train-iters", str(train_iters),
        "--lr", "1e-3", "--min-lr", "0", "--log-interval", "1", "--transformer-impl", "local",
        "--no-gradient-accumulation-fusion", "--use-cpu-initialization", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(cfg.vocab_size), "--mock-data", "--no-persist-layer-norm",
        "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
        "--position-embedding-type", "rope", "--disable-bias-linear", "--distributed-backend", "gloo",
        "--moe-probe", "--moe-probe-interval", str(interval), "--moe-probe-dir", out_dir,
        "--moe-probe-writers", "local", *extra,
    ]


class TokenCountContributor:
    """An interval contributor (session.IntervalContributor) as a dispatch-integrity check would
    be: its own router hooks, gated by the session, an int64 and a float64 part per interval,
    and a stop request from its verdict once `stop_after` iterations are in the records."""

    name = "token_check"

    def __init__(self, session, stop_after=None):
        self.session, self.stop_after = session, stop_after
        self.handles, self.seen = [], 0

    def attach(self, bindings):
        gate = self.session.gate
        self.tokens = torch.zeros(len(bindings), dtype=torch.long)
        self.tokens_f = torch.zeros(len(bindings), dtype=torch.float64)  # the float64 path of the flush
        for i, b in enumerate(bindings):
            def hook(module, args, output, i=i):
                if gate.should_count(module):  # exactly what the router counts
                    self.tokens[i] += output[1].shape[0]
                    self.tokens_f[i] += 0.5 * output[1].shape[0]
            self.handles.append(b.router.register_forward_hook(hook))

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def step(self):
        self.seen += 1

    def device_parts(self):
        return [self.tokens_f, self.tokens]  # mixed dtypes: the session splits them by dtype

    def read(self, reduced, snapshot):
        snapshot.extras[self.name] = {"tokens": reduced[1].tolist(), "half_tokens": reduced[0].tolist()}
        if self.stop_after is not None and snapshot.step >= self.stop_after:
            self.session.request_stop(f"token_check: stop after iteration {snapshot.step} (test)")

    def reset(self):
        self.tokens.zero_()
        self.tokens_f.zero_()


def run_megatron_train(rank: int, world: int, cfg, out_dir: str, train_iters: int, interval: int,
                       extra: tuple = (), start_iteration: int = 0, skip_update_at: tuple = (),
                       graphs_before_attach: bool = False, contributor_stop_after=None) -> dict:
    """One rank of Megatron's `train()` with the probe installed. Returns what the test needs to
    check the records independently: eval router calls seen, iterations trained, warnings."""
    import logging

    from megatron_moe_probe.cpu import compat as cpu_compat

    cpu_compat.enable()
    _cuda_tensors_to_cpu()
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.rerun_state_machine import RerunDataIterator, get_rerun_state_machine
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.enums import ModelType
    from megatron.training import arguments, global_vars
    from megatron.training import training as mt

    from megatron_moe_probe.megatron import flags
    from megatron_moe_probe.megatron import training as probe_training

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("megatron_moe_probe").addHandler(Collect())

    probe_training.install()  # the documented way: before Megatron's train() runs
    if contributor_stop_after is not False and contributor_stop_after is not None:
        from megatron_moe_probe import session as probe_session

        def add_contributor(session):
            session.add_contributor(TokenCountContributor(session, contributor_stop_after))

        probe_session.session_callbacks.append(add_contributor)
    sys.argv = megatron_argv(cfg, world, out_dir, train_iters, interval, extra)
    args = arguments.parse_args(extra_args_provider=flags.add_probe_args)
    arguments.validate_args(args)
    global_vars.set_global_variables(args, build_tokenizer=False)
    # What pretrain() and load_checkpoint() leave on args before train().
    args.iteration = start_iteration
    args.num_floating_point_operations_so_far = 0
    args.consumed_train_samples = start_iteration * args.global_batch_size
    args.padded_vocab_size = cfg.vocab_size
    args.do_train, args.do_valid, args.do_test = True, True, False

    from megatron.core import tensor_parallel
    from megatron.core.rerun_state_machine import RerunMode, initialize_rerun_state_machine

    initialize_rerun_state_machine(  # as initialize_megatron does
        state_save_func=lambda: {"rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()},
        state_restore_func=lambda s: tensor_parallel.get_cuda_rng_tracker().set_states(s["rng_tracker_states"]),
        # 0.19's parser says `report_stats`, its enum `report_determinism_stats`: initialize_megatron
        # would fail on that mode, so map it here.
        mode=RerunMode({"report_stats": "report_determinism_stats"}.get(args.rerun_mode, args.rerun_mode)))
    parallel_state.initialize_model_parallel(expert_model_parallel_size=cfg.ep, create_gloo_process_groups=True)
    torch.manual_seed(cfg.seed)
    mc_random.model_parallel_cuda_manual_seed(cfg.seed)
    model = cc.build_model(cfg)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    ddp.model_type = ModelType.encoder_or_decoder
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=0.0, clip_grad=0.0, bf16=False, fp16=False), [ddp])
    scheduler = mt.get_optimizer_param_scheduler(optimizer)

    if skip_update_at:  # what a loss-scale overflow does: Megatron's optimizer reports no update
        real_step = optimizer.step

        def step():
            ok, norm, zeros = real_step()
            return (False if args.curr_iteration + 1 in skip_update_at else ok), norm, zeros

        optimizer.step = step

    eval_calls = [0]  # router calls Megatron's evaluate() makes: must not be counted
    for module in model.modules():
        if type(module).__name__ == "TopKRouter":
            module.register_forward_hook(lambda m, a, o: eval_calls.__setitem__(0, eval_calls[0] + (not m.training)))

    def batches():
        g = torch.Generator().manual_seed(rank)
        while True:
            yield torch.randint(0, cfg.vocab_size, (cfg.micro_batch_size, cfg.seq_length + 1), generator=g)

    def forward_step(data_iterator, model):
        t = next(data_iterator)
        tokens, labels = t[:, :-1], t[:, 1:]
        positions = torch.arange(cfg.seq_length).unsqueeze(0).expand(cfg.micro_batch_size, -1)
        output = model(tokens, positions, cc.causal_mask(cfg.seq_length), labels=labels)

        def loss_func(output_tensor):
            loss = output_tensor.float().sum()
            n = torch.tensor(output_tensor.numel(), dtype=torch.int)
            # As pretrain_gpt's loss_func: the rerun state machine checks the loss.
            get_rerun_state_machine().validate_result(result=loss, rejection_func=torch.isnan,
                                                      message="found NaN in local forward loss calculation",
                                                      tolerance=0.0, fatal=True)
            return loss, n, {"lm loss": torch.stack([loss.detach(), n.float()])}

        return output, loss_func

    if graphs_before_attach:  # a full-iteration graph already captured (Megatron's own record of it)
        from megatron.core.full_cuda_graph import FullCudaGraphWrapper

        FullCudaGraphWrapper.cuda_graph["training"] = object()
    exit_code = None
    try:
        iteration, _ = mt.train(forward_step, [ddp], optimizer, scheduler, RerunDataIterator(batches()),
                                RerunDataIterator(batches()), None, model.config, {}, None)
    except SystemExit as exc:  # Megatron's own exit path (a stop request ends in sys.exit)
        exit_code, iteration = exc.code, getattr(args, "curr_iteration", None)
    finally:
        if graphs_before_attach:
            FullCudaGraphWrapper.cuda_graph["training"] = None
        probe_training.uninstall()
    return {"iteration": iteration, "eval_router_calls": eval_calls[0], "messages": messages,
            "exit_code": exit_code}
