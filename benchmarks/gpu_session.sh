#!/usr/bin/env bash
# Everything the GPU verification and overhead measurement need, in one device call.
#   bash benchmarks/gpu_session.sh OUT_DIR [ITERS_AB]
#   env: ONLY_AB=1 (overhead only), VARIANT=tiny-gpu:ep4 (recipe for steps 1-3),
#        COMPARE="tiny-gpu:ep4 tiny-gpu:ep4-allgather" (step 5: train each, then moe-probe compare)
# Expects the wheels the GPU image lacks in .whl/ (megatron-core, pydantic, wandb and their needs)
# and 2 GPUs. Results: OUT_DIR/results.tgz (runs, TensorBoard, wandb offline, JSON) + logs.
set -uo pipefail
OUT=${1:?out dir}; AB_ITERS=${2:-380}
RES=/tmp/res; rm -rf $RES; mkdir -p $RES
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true WANDB_DIR=$RES/wandb
export CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi -L | tee $RES/gpus.txt
NGPU=$(nvidia-smi -L | wc -l)
CLI="python3 -m megatron_moe_probe.cli"
VARIANT=${VARIANT:-tiny-gpu}; [ "$NGPU" = 1 ] && VARIANT=tiny-gpu:1gpu
step() { echo "=== $1 ($(date +%T))"; }

if [ "${ONLY_AB:-0}" = 1 ]; then RC1=0; else
step "1. moe-probe train tiny-gpu on $NGPU GPU(s), mock data, all writers, timing on"
$CLI train $VARIANT -- --train-iters 30 --moe-probe-dir $RES/run_mock \
  --moe-probe-writers local,tensorboard,wandb,console --tensorboard-dir $RES/tb --moe-probe-interval 10 \
  > $RES/run_mock.log 2>&1; RC1=$?; echo "exit $RC1" | tee -a $RES/run_mock.log; tail -25 $RES/run_mock.log

step "2. indexed dataset from real text, then training on it"
mkdir -p /tmp/text && cp $(python3 -c "import argparse,textwrap,pathlib,logging,dataclasses,inspect,typing,json.decoder as j;print(' '.join(m.__file__ for m in (argparse,textwrap,pathlib,logging,dataclasses,inspect,typing,j)))") /tmp/text/
$CLI build-dataset --input /tmp/text --output-prefix /tmp/textds > $RES/build.log 2>&1; echo "exit $?" >> $RES/build.log; tail -3 $RES/build.log
TEXT_ARGS=$(python3 -c "
from megatron_moe_probe import recipes as R
a = R.render(R.load_recipe('$VARIANT'))
print(' '.join(x for x in a if x != '--mock-data'))")
$CLI train --nproc-per-node $NGPU -- $TEXT_ARGS --train-iters 30 --data-path /tmp/textds --split 100,0,0 \
  --vocab-size 257 --moe-probe --moe-probe-dir $RES/run_text --moe-probe-writers local,console --moe-probe-interval 10 \
  > $RES/run_text.log 2>&1; echo "exit $?" | tee -a $RES/run_text.log; tail -12 $RES/run_text.log

fi
if [ "$AB_ITERS" -gt 0 ] && [ "$RC1" = 0 ]; then
step "3. overhead: in-process A/B + cost accounting + split verification, $AB_ITERS iterations"
python3 -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node $NGPU benchmarks/probe_overhead.py \
  --recipe $VARIANT --warmup 60 --window 20 --out $RES/overhead.json -- --train-iters $AB_ITERS \
  --log-interval 1000 --moe-probe --moe-probe-writers local --moe-probe-dir $RES/run_ab \
  > $RES/overhead.log 2>&1; echo "exit $?" | tee -a $RES/overhead.log; tail -45 $RES/overhead.log
fi
if [ "$NGPU" -gt 1 ] && [ "${ONLY_AB:-0}" != 1 ]; then
step "4. the same recipe on one GPU (EP=1), probe on with timing"
CUDA_VISIBLE_DEVICES=0 $CLI train tiny-gpu:1gpu -- --train-iters 20 --moe-probe-dir $RES/run_1gpu \
  --moe-probe-writers local,console --moe-probe-interval 10 > $RES/run_1gpu.log 2>&1
echo "exit $?" | tee -a $RES/run_1gpu.log; tail -8 $RES/run_1gpu.log
fi
if [ -n "${COMPARE:-}" ]; then
step "5. dispatcher comparison: $COMPARE (${COMPARE_ITERS:-100} iterations each)"
RUNS=()
for v in $COMPARE; do
  d=$RES/cmp_${v//[:]/_}; mkdir -p $d
  $CLI train $v -- --train-iters ${COMPARE_ITERS:-100} --moe-probe-dir $d --moe-probe-writers local \
    --moe-probe-interval 10 > $d/megatron.log 2>&1; echo "$v exit $?"; RUNS+=($d)
done
$CLI compare "${RUNS[@]}" --warmup 20 --plot $RES/compare.png | tee $RES/compare.txt
$CLI compare "${RUNS[@]}" --warmup 20 --json > $RES/compare.json
fi
for r in run_mock run_text run_1gpu; do [ -d $RES/$r ] && cp $RES/$r.log $RES/$r/megatron.log; done
tar czf $OUT/results.tgz -C $RES . && ls -la $OUT
