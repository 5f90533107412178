"""Real Megatron-Core MoE layers on CPU over gloo: the test harness and `moe-probe demo`.

Its own package, apart from megatron/ (the live adapter), because `compat.enable()` rebinds
parts of `torch.cuda` and Megatron process-wide: the training path never imports it, and
nothing here is needed to probe a GPU run.
"""
