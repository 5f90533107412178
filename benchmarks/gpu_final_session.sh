set -uo pipefail
STEPS=wheels bash benchmarks/gpu_production_path.sh $OUT > /tmp/wheels.log 2>&1 || { cat /tmp/wheels.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
( tar xzf .vendor/deepep-hybrid-ep-94a9f8f.tar.gz -C /tmp && cd /tmp/DeepEP && CPLUS_INCLUDE_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/include/cccl TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 python3 setup.py build_ext --inplace > /tmp/deepep_build.log 2>&1; echo "deepep build exit $?" >> /tmp/deepep_build.log ) &
R=/tmp/rs
PARALLEL=1 ITERS=1000 SWEEP_ITERS=400 MB=8 TRAIN_TIMEOUT=430 MOE_PROBE="python3 -m megatron_moe_probe.cli" timeout 540 bash scripts/routing_study.sh $R; echo "study exit $?"
wait
tail -3 /tmp/deepep_build.log
PYTHONPATH=/tmp/DeepEP:$PYTHONPATH python3 -c "from deep_ep import Buffer, HybridEPBuffer; import megatron.core.transformer.moe.fused_a2a as f; print('HAVE_DEEP_EP', f.HAVE_DEEP_EP, 'HAVE_HYBRIDEP', f.HAVE_HYBRIDEP)" 2>&1 | tail -1
PYTHONPATH=/tmp/DeepEP:$PYTHONPATH python3 -m megatron_moe_probe.cli recommend --hardware H200 --ep 2 --json 2>/dev/null > $OUT/recommend-h200-ep2.json; python3 -c "import json; d=json.load(open('$OUT/recommend-h200-ep2.json')); a=d.get('availability'); print({k:(v.get('available'),v.get('detail')) for k,v in a['backends'].items()} if isinstance(a,dict) and 'backends' in a else a)"
cp /tmp/deepep_build.log $OUT/ 2>/dev/null
tar czf $OUT/routing-study.tgz -C $R --exclude='*.bin' --exclude='*.idx' . 2>/dev/null; ls -la $OUT; du -sh $R/* 2>/dev/null | head -20
