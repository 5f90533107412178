"""Offline tools over recorded runs: compare runs side by side (local folders, wandb, Megatron's
log), train a matrix of runs and compare them, read wandb runs and Megatron's training log.
Nothing here imports torch or Megatron; runs are read through `megatron_moe_probe.record`."""
