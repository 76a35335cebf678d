#!/usr/bin/env bash
# One-GPU session (the two-GPU kinds were withheld): GPU tests and exactness with every node on the one GPU,
# then UCX between two processes on that GPU (cuda_ipc within a device): our transport now, our transport at
# the commit carried in .whl/old (OLD_REV), and raw ucxx, in both
# progress modes. No NCCL rows: NCCL refuses two ranks on one GPU.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site && tar xf .whl/site312.txz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -3
timeout 150 python3 benchmarks/gpu_exactness.py 2>&1 | grep -E "identical|DIFFERENT|MISMATCH|Error" | head -20
ARGS="--device cuda --backends ucx --sizes 4K,64K,1M,16M,64M --m2n 1x1 --tokens 1,16,256"
for mode in thread polling; do
  echo "== now, $mode"
  timeout 150 python3 -m expertmesh bench transport $ARGS --ucx-progress-mode $mode --json $OUT/bt_now_$mode.json 2>/dev/null
  echo "== at ${OLD_REV:-.whl/old}, $mode"
  (cd .whl/old && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 -m expertmesh bench transport $ARGS \
    --ucx-progress-mode $mode --json $OUT/bt_old_$mode.json 2>/dev/null)
done
