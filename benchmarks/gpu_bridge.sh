#!/usr/bin/env bash
# MoEProbeCallback inside Megatron-Bridge 0.6.2's pretrain() on one GPU (benchmarks/bridge_pretrain.py).
#   bash benchmarks/gpu_bridge.sh OUT_DIR WHEEL_DIR
# WHEEL_DIR: megatron-bridge 0.6.2 and what its training imports need that the GPU image lacks
# (megatron-core 0.19.2, pydantic, wandb, modelopt, nvidia-resiliency-ext, energon, hydra, ...;
# see docs/results/bridge-pretrain.md for the list and why).
set -uo pipefail
OUT=${1:?out dir}; WHL=${2:?wheel dir}
# A fresh target of its own: pip --target skips a top-level folder that exists (megatron/ from an earlier
# megatron-core install), which would leave megatron.bridge out; one install merges core and bridge.
rm -rf /tmp/site_bridge
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_bridge "$WHL"/*.whl || exit 1
# nvidia-resiliency-ext 0.4.1 (newest on PyPI) has no __version__; megatron-core 0.19.2 reads it when the
# async-checkpointing package is present and wants >= 0.6.0. Bridge's pretrain needs only its inprocess part.
rm -rf /tmp/site_bridge/nvidia_resiliency_ext/checkpointing
export PYTHONPATH=/tmp/site_bridge:/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi -L | tee "$OUT/gpu.txt"
timeout ${TRAIN_TIMEOUT:-300} python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/bridge_pretrain.py \
  --out "$OUT/bridge" ${BRIDGE_ARGS:-} > "$OUT/bridge.log" 2>&1
echo "exit $?" | tee -a "$OUT/bridge.log"
grep -v "^\s*$" "$OUT/bridge.log" | tail -60
rm -rf "$OUT/bridge/wandb/wandb/"*/files/media 2>/dev/null
