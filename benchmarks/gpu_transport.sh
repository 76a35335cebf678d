#!/usr/bin/env bash
# GPU session for the transport (issue 3), on the device machine with 2 GPUs: GPU exactness of the served
# path, then `bench transport` (ucx vs NCCL on the same GPUs) with UCX's defaults and two tunings.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site && tar xf .whl/site312.txz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -3   # includes packed CUDA frames
timeout 150 python3 benchmarks/gpu_exactness.py 2>&1 | grep -E "identical|DIFFERENT|MISMATCH|Error" | head -20
echo "== ucx defaults (thread progress, UCX's rendezvous threshold), NCCL alongside"
timeout 200 python3 -m expertmesh bench transport --device cuda --nccl --m2n 1x1 --json $OUT/bt_gpu_default.json 2>/dev/null
echo "== UCX_RNDV_THRESH=8192 (rendezvous, i.e. zero-copy cuda_ipc, from 8 KB up)"
UCX_RNDV_THRESH=8192 timeout 120 python3 -m expertmesh bench transport --device cuda --m2n 1x1 \
  --json $OUT/bt_gpu_rndv8k.json 2>/dev/null
echo "== UCX_TLS=cuda_ipc,cuda_copy,tcp,self (no shared-memory transports)"
UCX_TLS=cuda_ipc,cuda_copy,tcp,self timeout 120 python3 -m expertmesh bench transport --device cuda --m2n 1x1 \
  --json $OUT/bt_gpu_nosm.json 2>/dev/null
