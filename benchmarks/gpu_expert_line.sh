#!/usr/bin/env bash
# The experts' line where the planner's roofline floor is least sure (issue 14): Mixtral-8x7B and Qwen3-30B-A3B
# shapes, Triton fused MoE graphed as at decode, from 64 to 2048 tokens, i.e. across Mixtral's ridge (its reads and
# its math take the same time near 700 tokens on an H200), on one GPU:
#   alone    - bench layer --parts experts
#   mps      - POLL=1 (default): the same under CUDA MPS, Mixtral at 256 and 512 tokens ...
#   polled   - ... and with benchmarks/poll_beside.py's one-warp poll on the GPU beside it (what a one-GPU attention
#              node runs while its expert node computes at m = 1)
#   tests    - TESTS (default: the GPU tests of bench layer and MLA; TESTS=none: none)
#   serve    - SERVE=1: gpu_lockstep.sh's serve part with SHAPES (default mixtral), 1 client process, after the above
# Also lscpu (how many cores the host's CPUs are). JSON and logs in $OUT. Needs .whl/site312.txz carried.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT" && tar xf .whl/site312.txz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
lscpu > "$OUT/lscpu.txt"; grep -E "^CPU\(s\)|Thread|Core|Socket|Model name" "$OUT/lscpu.txt"
if [ "${TESTS:-}" != none ]; then
  timeout -k 10 ${TESTS_S:-180} python3 -m pytest -q -p no:cacheprovider --timeout 150 \
    ${TESTS:-tests/gpu/test_bench_layer_gpu.py tests/gpu/test_mla_gpu.py} > "$OUT/tests.log" 2>&1
  tail -3 "$OUT/tests.log"
fi
layer() {  # $1: name, the rest: bench layer arguments
  local name=$1; shift
  timeout -k 10 ${LAYER_S:-240} python3 -m expertmesh bench layer --device cuda --parts experts --moe-backends triton \
    "$@" --json "$OUT/experts_$name.json" > "$OUT/experts_$name.log" 2>&1
  grep -E "^device|experts " "$OUT/experts_$name.log" | sed "s/^/$name: /" | tail -${LAYER_TAIL:-40}
}
layer alone --shapes mixtral,qwen3 --tokens ${TOKENS:-64,256,384,512,768,1024,1536,2048}
if [ "${POLL:-1}" = 1 ]; then
  nvidia-cuda-mps-control -d && echo "MPS on"
  layer mps --shapes mixtral --tokens 256,512
  python3 benchmarks/poll_beside.py --ready /tmp/poll_ready > "$OUT/poll.log" 2>&1 &
  poller=$!
  for _ in $(seq 600); do [ -e /tmp/poll_ready ] && break; sleep 0.1; done
  layer polled --shapes mixtral --tokens 256,512
  kill -TERM $poller; wait $poller; cat "$OUT/poll.log"
  echo quit | nvidia-cuda-mps-control
fi
if [ "${SERVE:-0}" = 1 ]; then
  OUT=$OUT/serve GPUS=1 PARTS=serve SHAPES=${SHAPES:-mixtral} GATEWAY_WORKERS=4 CLIENT_PROCESSES=1 CONCURRENCY=256 \
    TRANSPORTS=ipc REQUESTS_PER_SLOT=16 MICROBATCHES=${MICROBATCHES:-1} SWEEP_S=${SWEEP_S:-150} \
    COLOCATED_S=${COLOCATED_S:-110} bash benchmarks/gpu_lockstep.sh
  rm -f "$OUT"/serve/topo.txt
fi
exit 0
