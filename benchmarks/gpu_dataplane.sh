#!/usr/bin/env bash
# The GPU session of issue 9 on one H200 (device tool, `nvidia-h200`), part 1: kernel tests against their torch
# references, decode steps under sync-debug and CUDA graphs, then `bench layer` for both shapes. Logs and JSON in
# $OUT. Needs .whl/site312.txz (benchmarks/gpu_wheels.sh) carried.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT" && tar xf .whl/site312.txz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout ${TESTS_S:-240} python3 -m pytest -q -rf -p no:cacheprovider --timeout 120 ${TESTS:-tests/gpu} 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
timeout ${BENCH_S:-300} python3 -m expertmesh bench layer ${BENCH_ARGS:-} --json "$OUT/bench_layer.json" 2>&1 \
  | tee "$OUT/bench_layer.log" | tail -45
# optional: the fused-MoE tile sweep (MOE_SWEEP=1), inside this script's environment
[ -n "${MOE_SWEEP:-}" ] && timeout 200 python3 benchmarks/moe_sweep.py --budget-s 170 --json "$OUT/moe_sweep.json" 2>&1 | tail -25
exit 0
