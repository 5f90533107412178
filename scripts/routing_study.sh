#!/usr/bin/env bash
# The routing study of issue 14 on one GPU (H200): a small MoE (tiny-gpu:1gpu, 4 MoE layers,
# 32 experts top-4, hidden 1024) trained on the four-domain blend built on the machine, the
# same model on mock tokens, a batch-size sweep on the blend, then `moe-probe analyze`.
#
#   bash scripts/routing_study.sh OUT            # everything into OUT/
#   ITERS=3000 SWEEP_ITERS=1000 SWEEP="4 16 32" BATCH=8 SEQ=512 bash scripts/routing_study.sh OUT
#   PARALLEL=1 ...   all trainings at once on the one GPU: the tiny model is launch-bound, so five
#                    processes share an H200 at little cost per step, and routing counts do not
#                    depend on timing (each run has its own torchrun --standalone port)
#
# OUT/data/{code,prose,math,data}.bin/.idx  the datasets (moe-probe build-dataset --domains)
# OUT/blend, OUT/mock, OUT/sweep-gbsN      run folders (intervals.jsonl + iterations/*.npz)
# OUT/analysis.txt / .json, OUT/sweep.txt / .json, OUT/plots/*.png   for docs/results/routing-study.md
set -euo pipefail
OUT=${1:?usage: routing_study.sh OUT_DIR}
ITERS=${ITERS:-3000}            # iterations of the blend and mock runs
SWEEP_ITERS=${SWEEP_ITERS:-1000}
SWEEP=${SWEEP:-"4 16 32"}       # global batch sizes of the sweep (the blend run's BATCH is the fourth point)
BATCH=${BATCH:-8}               # sequences per iteration (one micro-batch)
SEQ=${SEQ:-512}
MB=${MB:-16}                    # MB of text per domain
MOE_PROBE=${MOE_PROBE:-moe-probe}
PARALLEL=${PARALLEL:-0}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-0}  # seconds per training (0: none); a run cut short fails loudly
mkdir -p "$OUT"

stamp() { echo "[$(date +%H:%M:%S)] $*" >&2; }

stamp "build the four domain datasets"
$MOE_PROBE build-dataset --domains "$OUT/data" --max-mb "$MB" --no-progress | tee "$OUT/build-dataset.txt"
BLEND=(1 "$OUT/data/code" 1 "$OUT/data/prose" 1 "$OUT/data/math" 1 "$OUT/data/data")

train() {  # NAME ITERATIONS GLOBAL_BATCH [moe-probe train args...]
  local name=$1 iters=$2 gbs=$3; shift 3
  stamp "train $name: $iters iterations, global batch $gbs x $SEQ"
  local t0=$SECONDS
  timeout "$TRAIN_TIMEOUT" $MOE_PROBE train tiny-gpu:1gpu "$@" -- \
    --tokenizer-type NullTokenizer --vocab-size 257 --seq-length "$SEQ" --max-position-embeddings "$SEQ" \
    --micro-batch-size "$gbs" --global-batch-size "$gbs" --train-iters "$iters" --eval-iters 0 \
    --log-interval 100 --moe-probe-interval 100 --moe-probe-dir "$OUT/$name" \
    --moe-probe-writers local --moe-probe-iterations counts > "$OUT/$name.log" 2>&1 \
    || { tail -40 "$OUT/$name.log"; exit 1; }
  stamp "train $name: done in $((SECONDS - t0)) s"
}

pids=()
launch() {  # train, in the background under PARALLEL=1
  if [[ $PARALLEL == 1 ]]; then train "$@" & pids+=($!); else train "$@"; fi
}
launch blend "$ITERS" "$BATCH" --data-path "${BLEND[@]}"
launch mock "$ITERS" "$BATCH"
for gbs in $SWEEP; do
  launch "sweep-gbs$gbs" "$SWEEP_ITERS" "$gbs" --data-path "${BLEND[@]}"
done
for pid in "${pids[@]}"; do wait "$pid" || { stamp "a training failed"; exit 1; }; done

stamp "analyze"
SWEEP_RUNS=()
for gbs in $SWEEP; do SWEEP_RUNS+=("$OUT/sweep-gbs$gbs"); done
$MOE_PROBE analyze "$OUT/blend" --against "$OUT/mock" --plot-dir "$OUT/plots" > "$OUT/analysis.txt"
$MOE_PROBE analyze "$OUT/blend" --against "$OUT/mock" --json > "$OUT/analysis.json"
# The sweep on the same iterations of every run (the blend run is the BATCH point).
$MOE_PROBE analyze "$OUT/blend" --steps ":$SWEEP_ITERS" --sweep "${SWEEP_RUNS[@]}" --plot-dir "$OUT/plots-sweep" \
  > "$OUT/sweep.txt"
$MOE_PROBE analyze "$OUT/blend" --steps ":$SWEEP_ITERS" --sweep "${SWEEP_RUNS[@]}" --json > "$OUT/sweep.json"
du -sh "$OUT"/blend/iterations "$OUT"/mock/iterations >&2
stamp "done: $OUT/analysis.txt, $OUT/sweep.txt, $OUT/plots/, $OUT/plots-sweep/batch_size.png"
