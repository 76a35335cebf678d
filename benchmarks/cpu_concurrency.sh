#!/usr/bin/env bash
# Does a node's compute slow down while another node computes on the host's other core? (issue 14: the CPU rows with
# 3 and 4 node processes on this 2-core machine are over-predicted in every run, those with 1 or 2 are not.)
# `bench layer` on the CPU rows' model, alone, then PROCESSES (default 2) copies at once, then alone again, ROUNDS
# times; each copy's JSON in $O. benchmarks/cpu_concurrency.py compares them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
O=${O:-/tmp/cpu_concurrency}
MODEL=${MODEL:-models/expertmesh-mini}
mkdir -p "$O"
layer() { OMP_NUM_THREADS=1 $PY -m expertmesh bench layer --device cpu --shapes $MODEL --tokens 8,32 --contexts 64 \
  --dtype float32 --reps ${REPS:-40} --moe-backends reference --json "$1" > /dev/null; }
for round in $(seq ${ROUNDS:-3}); do
  layer "$O/alone_${round}a.json"
  for p in $(seq ${PROCESSES:-2}); do layer "$O/together_${round}_$p.json" & done
  wait
  layer "$O/alone_${round}b.json"
done
echo "$O"
