#!/usr/bin/env bash
# The gateway on the GPU host's cores (issue 14, fourteenth session): benchmarks/gateway_cpu.py, the real gateway
# processes between bench serve's closed-loop client and a stand-in attention node that paces one token per running
# request every STEP_MS (default 4.5, the one-H200 short rows' step), 256 in flight, 96 tokens each: the host path of
# those rows without their GPU work. Rows, each a fresh set of processes:
#   before - the tree in OLD (default build/snap_old: `git archive` of a commit from before the fourteenth session:
#            one chunk per token)
#   after  - this tree (tokens that queued up while a stream waited go out in one chunk)
# at 4 gateways, then `after` at WORKERS_MORE (default 7: what `expertmesh plan` asked for the README's plan in the
# fourteenth session; 0: none).
# CPU only: no GPU is touched. Needs .whl/site312.txz (benchmarks/gpu_wheels.sh) and models/ (the tokenizer).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT" && tar xf .whl/site312.txz -C /tmp/site
lscpu | grep -E "^Model name|^CPU\(s\)|^Thread" > "$OUT/lscpu.txt"
here=$PWD
old=$(realpath ${OLD:-build/snap_old})
args="--requests ${REQUESTS:-4096} --tokens 96 --concurrency 256 --step-ms ${STEP_MS:-4.5} --repeats ${REPEATS:-2}"
run() {  # name, tree, extra arguments
  echo "== $1" | tee -a "$OUT/gateway_cpu.txt"
  (cd "$2" && PYTHONPATH=/tmp/site:$2 timeout -k 5 ${ROW_S:-120} python3 "$here/benchmarks/gateway_cpu.py" $args \
    "${@:3}" 2>&1 | grep -E "gateway\(s\)|failed|Error|Traceback" | tee -a "$OUT/gateway_cpu.txt")
  pkill -9 -f "m expertmesh[.]gateway --config" 2>/dev/null; true
}
[ -d "$old" ] && run before "$old" --workers 4
run after "$here" --workers 4
[ "${WORKERS_MORE:-7}" = 0 ] || run "after, ${WORKERS_MORE:-7} gateways" "$here" --workers ${WORKERS_MORE:-7}
