#!/usr/bin/env bash
# The production path on one H200 (issue 10), in steps that each fit one 10-minute device call.
#   STEPS="wheels chunk counting" MODES=local,local-graph bash benchmarks/gpu_production_path.sh OUT
#   STEPS="chunk"                     (copy the carried Transformer Engine chunk .tecN/partN to /tmp/tec)
#   STEPS="te counting" MODES=te,...  (assemble + install TE 2.20.2, build its torch extension, then modes)
#   STEPS="overhead"                  (Qwen3-30B-A3B layer shape on the TE path: probe cost accounting and
#                                      A/B, then --no-probe baseline vs Megatron's RouterTracer and
#                                      --save-tokens-per-expert-interval 1, side by side)
# Carried: .whl/ (megatron-core, pydantic and friends, transformer_engine + its torch sdist) and the
# five .tecN/partN chunks of the transformer_engine_cu13 core wheel (see ../shared/notes/gpu-recipes.md).
set -uo pipefail
OUT=${1:?out dir}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STEPS=${STEPS:-wheels}
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo "=== $1 ($(date +%T))"; }
CLI="python3 -m megatron_moe_probe.cli"

if want wheels; then
  step "wheels"
  rm -rf /tmp/site/transformer_engine*  # a meta package without its core breaks every import of it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  nvidia-smi -L
fi
if want chunk; then
  mkdir -p /tmp/tec && cp .tec*/part* /tmp/tec/ && ls -la /tmp/tec
fi
if want te; then
  step "transformer engine 2.20.2"
  W=/tmp/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl
  cat /tmp/tec/part0 /tmp/tec/part1 /tmp/tec/part2 /tmp/tec/part3 /tmp/tec/part4 > $W || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $W .whl/te/transformer_engine-2.20.2-py3-none-any.whl || exit 1
  rm -rf /tmp/transformer_engine_torch-2.20.2 && tar xzf .whl/te/transformer_engine_torch-2.20.2.tar.gz -C /tmp
  (cd /tmp/transformer_engine_torch-2.20.2 && NVTE_CUDA_ARCHS=90 MAX_JOBS=16 NVTE_FRAMEWORK=pytorch \
     python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site_tet . > /tmp/tet_build.log 2>&1) \
     || { tail -20 /tmp/tet_build.log; exit 1; }
  cp -r /tmp/site_tet/* /tmp/site/
  python3 -c "import transformer_engine.pytorch as te, transformer_engine; print('TE', transformer_engine.__version__)" 2>&1 | tail -1
  $CLI recommend --hardware H200 --ep 1 --json 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print('availability:', {k: v.get('available') for k, v in d.get('availability', {}).get('backends', {}).items()} if isinstance(d.get('availability'), dict) else d.get('availability'))" || true
fi
if want counting; then
  step "counting modes: ${MODES:-all}"
  mkdir -p $OUT/counting
  python3 benchmarks/counting_modes.py --out /tmp/counting --iters ${ITERS:-30} --interval 10 \
    ${MODES:+--modes $MODES} --timeout ${MODE_TIMEOUT:-200}
  cp /tmp/counting/counting_modes.json $OUT/counting/counting_modes-$(echo ${MODES:-all} | tr ',' '_').json
  for f in /tmp/counting/*.log; do tail -40 $f > $OUT/counting/$(basename $f).tail; done
fi
if want overhead; then
  step "overhead at the Qwen3-30B-A3B layer shape (TE), probe accounting + A/B"
  R=tiny-gpu:qwen3-layer-te
  python3 -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 1 benchmarks/probe_overhead.py \
    --recipe $R --warmup ${AB_WARMUP:-20} --window ${AB_WINDOW:-10} --out /tmp/overhead.json -- \
    --train-iters ${AB_ITERS:-140} --log-interval 1000 --moe-probe --moe-probe-writers local \
    --moe-probe-dir /tmp/run_ab > /tmp/overhead.log 2>&1; echo "exit $?"; tail -30 /tmp/overhead.log
  cp /tmp/overhead.rank0.json $OUT/overhead-qwen3-layer-te.json 2>/dev/null
  N=${REC_ITERS:-30}
  for v in baseline tracer tpe; do
    step "recorder run: $v ($N iterations, --no-probe)"
    case $v in
      baseline) extra="" ;;
      tracer) extra="--moe-routing-trace-path /tmp/trace" ;;
      tpe) extra="--save-tokens-per-expert-interval 1 --save /tmp/ck_tpe --save-interval 100000 --no-save-optim --no-save-rng" ;;
    esac
    timeout ${REC_TIMEOUT:-150} $CLI train $R --no-probe -- --train-iters $N --log-interval 5 $extra > /tmp/rec_$v.log 2>&1
    echo "exit $?"; grep -E "iteration +[0-9]+/" /tmp/rec_$v.log | tail -3
    cp /tmp/rec_$v.log $OUT/recorder_$v.log
  done
  du -sb /tmp/trace /tmp/ck_tpe/tokens_per_expert 2>/dev/null | tee $OUT/recorder_sizes.txt
fi
ls -la $OUT
