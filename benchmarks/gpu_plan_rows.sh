#!/usr/bin/env bash
# The served rows the planner is checked against (issue 14; benchmarks/plan_validation.py --gpu-rows), in one device
# call on one H200 (GPUS=1, both nodes under MPS) or two (GPUS=2): Qwen3-30B-A3B shape with 8 layers, 256 in
# flight, 4 gateway processes,
#   short - 64-128-token prompts and outputs, 16 requests per slot: 1+1 at m = 1 and 2, and colocated
#   long  - 3.5k-token prompts, 1024 output tokens, one wave: 1+1 at m = 1 and 2, and colocated
#   split - GPUS=1: long, 1+1 at m = 1 with the SMs split 70/30 (two GPU types on one card), bench layer under each
# each part in a folder of its own under $OUT, all of them tarred into $OUT/plan_rows.tgz at the end (the device
# tool brings back 8 files at most). CLIENT_PROCESSES (default 1 on one GPU, whose 16-CPU host had too few cores
# for more beside 4 gateways; 2 on two GPUs) spreads bench serve's client. About 8 minutes for all three parts on one
# H200 (twelfth session). Run from a tree with models/ and .whl/site312.txz, as gpu_lockstep.sh needs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
GPUS=${GPUS:-1}
SHAPES=${SHAPES:-qwen3}  # SHAPES="qwen3 mixtral": both shapes' rows
export GPUS GATEWAY_WORKERS=4 CONCURRENCY=256 SHAPES PARTS=serve
export CLIENT_PROCESSES=${CLIENT_PROCESSES:-$([ "$GPUS" = 1 ] && echo 1 || echo 2)}
export TRANSPORTS=ipc
for part in ${PLAN_PARTS:-short long split}; do
  case $part in
  short) OUT=$OUT/short MICROBATCHES="1 2" REQUESTS_PER_SLOT=16 SWEEP_S=220 COLOCATED_S=120 \
           bash benchmarks/gpu_lockstep.sh ;;
  long)  OUT=$OUT/long MAX_POS=8192 INPUT_LEN="3500 3584" OUTPUT_LEN="1024 1024" REQUESTS_PER_SLOT=1 \
           MICROBATCHES="1 2" SWEEP_S=260 COLOCATED_S=130 bash benchmarks/gpu_lockstep.sh ;;
  split) [ "$GPUS" = 1 ] && OUT=$OUT/split MAX_POS=8192 INPUT_LEN="3500 3584" OUTPUT_LEN="1024 1024" \
           REQUESTS_PER_SLOT=1 MICROBATCHES=1 COLOCATED=0 SM_SHARES="70 30" LAYER_S=70 SWEEP_S=140 \
           bash benchmarks/gpu_lockstep.sh ;;
  esac
done
cd "$OUT" || exit 1
parts=$(ls -d short long split 2>/dev/null)
[ -z "$parts" ] || { tar czf plan_rows.tgz $parts && rm -rf $parts; }
