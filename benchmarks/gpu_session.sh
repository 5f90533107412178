#!/usr/bin/env bash
# Everything the GPU verification and overhead measurement need, in one device call.
#   bash benchmarks/gpu_session.sh OUT_DIR [ITERS_AB]
#   env: STEPS="train text ab 1gpu matrix" (the default: all; pick any), VARIANT=tiny-gpu:ep4 (recipe of
#        train/text/ab), COMPARE="tiny-gpu tiny-gpu:allgather" (matrix: `moe-probe matrix` of these
#        recipes on mock data and on the real-text dataset), COMPARE_ITERS (100), REPEAT (1)
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
STEPS=${STEPS:-train text ab 1gpu matrix}
step() { echo "=== $1 ($(date +%T))"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

RC1=0
if want train; then
step "1. moe-probe train tiny-gpu on $NGPU GPU(s), mock data, all writers, timing on"
$CLI train $VARIANT -- --train-iters 30 --moe-probe-dir $RES/run_mock \
  --moe-probe-writers local,tensorboard,wandb,console --tensorboard-dir $RES/tb --moe-probe-interval 10 \
  > $RES/run_mock.log 2>&1; RC1=$?; echo "exit $RC1" | tee -a $RES/run_mock.log; tail -25 $RES/run_mock.log
fi
if want text || want matrix; then
step "2. indexed dataset from real text, then training on it"
mkdir -p /tmp/text && cp $(python3 -c "import argparse,textwrap,pathlib,logging,dataclasses,inspect,typing,json.decoder as j;print(' '.join(m.__file__ for m in (argparse,textwrap,pathlib,logging,dataclasses,inspect,typing,j)))") /tmp/text/
$CLI build-dataset --input /tmp/text --output-prefix /tmp/textds > $RES/build.log 2>&1; echo "exit $?" >> $RES/build.log; tail -3 $RES/build.log
fi
if want text; then
TEXT_ARGS=$(python3 -c "
from megatron_moe_probe import recipes as R
a = R.render(R.load_recipe('$VARIANT'))
print(' '.join(x for x in a if x != '--mock-data'))")
$CLI train --nproc-per-node $NGPU -- $TEXT_ARGS --train-iters 30 --data-path /tmp/textds --split 100,0,0 \
  --vocab-size 257 --moe-probe --moe-probe-dir $RES/run_text --moe-probe-writers local,console --moe-probe-interval 10 \
  > $RES/run_text.log 2>&1; echo "exit $?" | tee -a $RES/run_text.log; tail -12 $RES/run_text.log

fi
if want ab && [ "$AB_ITERS" -gt 0 ] && [ "$RC1" = 0 ]; then
step "3. overhead: in-process A/B + cost accounting + split verification, $AB_ITERS iterations"
python3 -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node $NGPU benchmarks/probe_overhead.py \
  --recipe $VARIANT --warmup 60 --window 20 --out $RES/overhead.json -- --train-iters $AB_ITERS \
  --log-interval 1000 --moe-probe --moe-probe-writers local --moe-probe-dir $RES/run_ab \
  > $RES/overhead.log 2>&1; echo "exit $?" | tee -a $RES/overhead.log; tail -45 $RES/overhead.log
fi
if want 1gpu && [ "$NGPU" -gt 1 ]; then
step "4. the same recipe on one GPU (EP=1), probe on with timing"
CUDA_VISIBLE_DEVICES=0 $CLI train tiny-gpu:1gpu -- --train-iters 20 --moe-probe-dir $RES/run_1gpu \
  --moe-probe-writers local,console --moe-probe-interval 10 > $RES/run_1gpu.log 2>&1
echo "exit $?" | tee -a $RES/run_1gpu.log; tail -8 $RES/run_1gpu.log
fi
if want matrix && [ -n "${COMPARE:-}" ]; then
step "5. moe-probe matrix: $COMPARE on mock data and real text, ${COMPARE_ITERS:-100} iterations, ${REPEAT:-1} repeat(s)"
$CLI matrix $COMPARE --data recipe,/tmp/textds --iters ${COMPARE_ITERS:-100} --repeat ${REPEAT:-1} \
  --out $RES/matrix 2>&1 | tee $RES/matrix.txt | grep -v "^training "
fi
for r in run_mock run_text run_1gpu; do [ -d $RES/$r ] && cp $RES/$r.log $RES/$r/megatron.log; done
tar czf $OUT/results.tgz -C $RES . && ls -la $OUT
