#!/usr/bin/env bash
# Issue 21's GPU measurements in one device call (one GPU; see docs/performance.md):
#   bash benchmarks/gpu_live.sh OUT WHEELS      (WHEELS: megatron-core, pydantic and friends, pytest)
# 1. tests/test_colsum.py: the Triton kernel against Python's counts, and over CUDA-graph replays;
# 2. benchmarks/live_overhead.py: hook host us and launches per call (old body vs new), the timing
#    overhead and Megatron's recorders, interleaved in one process (Qwen3-30B-A3B layer shape, local);
# 3. benchmarks/counting_modes.py local mode (the counting contract through `moe-probe train`).
set -uo pipefail
OUT=${1:?out dir}; WHEELS=${2:?wheels dir}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/device.txt" 2>&1
echo "=== colsum $(date +%T)"; timeout 120 python3 -m pytest tests/test_colsum.py -q -p no:cacheprovider > "$OUT/colsum_tests.txt" 2>&1; tail -3 "$OUT/colsum_tests.txt"
echo "=== live_overhead $(date +%T)"; timeout ${LIVE_TIMEOUT:-300} python3 benchmarks/live_overhead.py --out "$OUT" > "$OUT/live_overhead.log" 2>&1; echo "exit $?"; tail -5 "$OUT/live_overhead.log"
if [ "${COUNTING:-1}" = 1 ]; then
  echo "=== counting_modes local $(date +%T)"
  timeout ${COUNTING_TIMEOUT:-200} python3 benchmarks/counting_modes.py --out /tmp/counting --iters 20 --interval 10 --modes local --timeout 180 > "$OUT/counting_modes.log" 2>&1
  echo "exit $?"; tail -8 "$OUT/counting_modes.log"; cp /tmp/counting/counting_modes.json "$OUT/" 2>/dev/null
fi
echo "=== done $(date +%T)"
