#!/usr/bin/env bash
# Build DeepEP's hybrid-ep branch (DeepEP Buffer + HybridEPBuffer) on the GPU machine and show
# what the availability gate (`moe-probe recommend --json`, field availability) says before/after.
#   bash benchmarks/build_deepep.sh [OUT_DIR]
# Expects .vendor/deepep-hybrid-ep-94a9f8f.tar.gz in the repo root (an ignored folder, carried),
# and megatron-core (plus its needs) in /tmp/site or importable already. One GPU is enough.
# Exit status: 0 when both imports work and the gate reports deepep and hybridep available;
# otherwise non-zero, after printing the exact error line.
# After it: PYTHONPATH=/tmp/DeepEP:/tmp/site:$PWD makes deep_ep importable for later commands
# (while the machine stays warm).
set -uo pipefail
OUT=${1:-/tmp/deepep_out}; mkdir -p "$OUT"
TARBALL=.vendor/deepep-hybrid-ep-94a9f8f.tar.gz
SRC=/tmp/DeepEP
CUDA_CCCL=${CUDA_CCCL:-/usr/local/cuda-13.0/targets/x86_64-linux/include/cccl}
ROOT=$PWD
export PYTHONPATH=$SRC:/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
CLI="python3 -m megatron_moe_probe.cli"

fail() { echo "build_deepep: FAILED: $*" | tee -a "$OUT/summary.txt"; exit "${2:-1}"; }
gate() {  # print one line per flex backend from the gate's JSON
  $CLI recommend --hardware H200 --ep 2 --json > "$OUT/gate_$1.json" 2> "$OUT/gate_$1.err" \
    || { echo "gate ($1) failed: $(tail -1 "$OUT/gate_$1.err")"; return 1; }
  python3 - "$OUT/gate_$1.json" "$1" <<'PY'
import json, sys
av = json.load(open(sys.argv[1]))["availability"]
for name in ("deepep", "hybridep", "ncclep"):
    b = av["backends"][name]
    print(f"gate {sys.argv[2]}: {name}: {'installed' if b['available'] else 'missing'} ({b['detail'][:160]})")
PY
}

[ -f "$TARBALL" ] || fail "$TARBALL not found (carry the ignored folder .vendor/ with the tarball in it)" 2
echo "=== gate before the build"; gate before | tee "$OUT/gate_before.txt"

echo "=== unpack and build ($(date +%T))"
rm -rf "$SRC" && tar xzf "$TARBALL" -C /tmp || fail "tar xzf $TARBALL failed"
[ -f "$SRC/setup.py" ] || fail "$SRC/setup.py missing after unpacking (the tarball must hold DeepEP/)"
[ -d "$CUDA_CCCL" ] || echo "warning: $CUDA_CCCL not found; the build may stop at nvshmem_tensor.h: cuda/std/tuple"
export CPLUS_INCLUDE_PATH=$CUDA_CCCL${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
START=$(date +%s)
( cd "$SRC" && TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    python3 setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1
RC=$?
echo "build exit $RC after $(( $(date +%s) - START )) s (log: $OUT/build.log)"
if [ $RC -ne 0 ]; then
  LINE=$(grep -m1 -E "error:|Error:|fatal error" "$OUT/build.log" || tail -1 "$OUT/build.log")
  fail "build exit $RC: $LINE" $RC
fi

echo "=== imports"
python3 -c "from deep_ep import Buffer, HybridEPBuffer; from deep_ep.utils import EventOverlap; import deep_ep; print('deep_ep from', deep_ep.__file__)" \
  > "$OUT/import.log" 2>&1 || fail "import: $(tail -1 "$OUT/import.log")" 3
cat "$OUT/import.log"
python3 -c "
from megatron.core.transformer.moe import fused_a2a as f
print('megatron fused_a2a: HAVE_DEEP_EP', f.HAVE_DEEP_EP, 'HAVE_HYBRIDEP', f.HAVE_HYBRIDEP)" 2>&1 | tail -1

echo "=== gate after the build"; gate after | tee "$OUT/gate_after.txt"
for name in deepep hybridep; do
  grep -q "gate after: $name: installed" "$OUT/gate_after.txt" \
    || fail "the gate still reports $name missing: $(grep "gate after: $name" "$OUT/gate_after.txt")" 4
done
echo "build_deepep: OK: deep_ep (Buffer, HybridEPBuffer) built in $SRC; the gate reports deepep and hybridep installed" | tee -a "$OUT/summary.txt"
