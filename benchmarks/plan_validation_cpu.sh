#!/usr/bin/env bash
# CPU rows for benchmarks/plan_validation.py, each served right after its own calibration (bench layer on the row's
# model, bench transport, and a traced 1x1 run of that model decoding 16 x (32 in, 32 out): the served round, the
# parts' served time and the host work per step, planner/served.py), so that all see the same share of this shared
# machine; /proc/loadavg around each. bench layer also times prefill chunks (eager), and the traced run is repeated at
# 4 and 32 sequences for the host time per step as a line in the sequences (planner/served.py: step_host_line).
# O=benchmarks/planner/paired was the run without the traced calibration; planner/served{,_2} without prefill rows
# and host line; planner/prefill with them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
O=${O:-benchmarks/planner/served}
mkdir -p $O
[ -d /tmp/mbig ] || $PY -m expertmesh make-model --out /tmp/mbig --hidden-size 512 --num-layers 4 --num-heads 8 \
  --num-kv-heads 4 --head-dim 64 --intermediate-size 1024 --num-experts 8 --vocab-size 2048 >/dev/null
W="--num-requests 48 --concurrency 16 --input-len 32 64 --output-len 32 64"
W2="--num-requests 48 --concurrency 32 --input-len 16 32 --output-len 32 48"
HOST_CONCURRENCIES=${HOST_CONCURRENCIES:-4 32}  # beside the traced run at 16
row() {  # name, model, then microbatch_sweep flags; ROWS="name ...": only those (a row served again alone)
  local name=$1 model=$2; shift 2
  [ -z "${ROWS:-}" ] || [[ " $ROWS " == *" $name "* ]] || return 0
  cat /proc/loadavg > $O/$name.load
  OMP_NUM_THREADS=1 $PY -m expertmesh bench layer --device cpu --shapes $model --tokens 1,8,32 --contexts 64 \
    --dtype float32 --reps 10 --moe-backends reference --prefill-tokens 64,256,1024 --prompt-len 48 \
    --json $O/${name}_layer.json >/dev/null
  OMP_NUM_THREADS=1 $PY -m expertmesh bench transport --backends zmq --m2n 1x1 --tokens 1,16 --hidden 256 \
    --dtype float32 --sizes 4K --iters 30 --json $O/${name}_transport.json >/dev/null
  $PY benchmarks/microbatch_sweep.py --model $model --expert-nodes 1 --microbatches 1 --num-requests 16 \
    --concurrency 16 --input-len 32 32 --output-len 32 32 --trace $O/${name}_served.trace.json \
    --json $O/${name}_served.json 2>/dev/null >/dev/null
  for c in $HOST_CONCURRENCIES; do  # host time per step at other batch sizes: its line in the sequences a node holds
    $PY benchmarks/microbatch_sweep.py --model $model --expert-nodes 1 --microbatches 1 --num-requests $c \
      --concurrency $c --input-len 32 32 --output-len 32 32 --trace $O/${name}_served_c$c.trace.json \
      --json $O/${name}_served_c$c.json 2>/dev/null >/dev/null
  done
  $PY benchmarks/microbatch_sweep.py --model $model "$@" --json $O/$name.json 2>/dev/null | grep '^m='
  cat /proc/loadavg >> $O/$name.load
}
row mini_colocated models/expertmesh-mini --expert-nodes 0 --microbatches 1 $W
row mini_1x1 models/expertmesh-mini --expert-nodes 1 --microbatches 1 2 $W
row mini_1x2 models/expertmesh-mini --expert-nodes 2 --microbatches 1 $W
row mini_2x2 models/expertmesh-mini --attention-nodes 2 --expert-nodes 2 --microbatches 1 $W
row mbig_colocated /tmp/mbig --expert-nodes 0 --microbatches 1 $W2
row mbig_1x1 /tmp/mbig --expert-nodes 1 --microbatches 1 2 $W2
