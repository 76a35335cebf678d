#!/usr/bin/env bash
# The gateway on the GPU host's cores (issue 14): `expertmesh bench gateway`, the real gateway processes between
# bench serve's closed-loop client and a stand-in attention node that paces one token per running request every
# STEP_MS (default 4.5, the one-H200 short rows' step), 256 in flight, 96 tokens each: the host path of those rows
# without their GPU work, and the planner's gateway calibration for this host (a JSON per row, which a calibration
# file's bench_gateway entry reads). Rows, each a fresh set of processes, CLIENT_PROCESSES (default "1 4") client
# processes each: WORKERS (default 4) gateways, then WORKERS_MORE (default 0: none). About 40 s a row.
# SHAPES (default "qwen3 mixtral"): each with the tokenizer of gpu_lockstep.sh's random model of that shape (its
# vocabulary, the same seed), into gateway_<shape>_w<W>_c<C>.json, which plan_validation.host_probe gives that
# shape's rows: the stand-in's tokens, drawn from the vocabulary, detokenize as a random-weight model's do (mostly
# special ids, which cost the gateway more than the shipped model's until the sixteenth session mended TextStream:
# RESULTS.md). SHAPES=mini: models/expertmesh-mini,
# into gateway_w<W>_c<C>.json (the sixteenth session's calls 1 and 2).
# CPU only: no GPU is touched. Needs .whl/site312.txz (benchmarks/gpu_wheels.sh) and models/ (the tokenizer).
# (The fourteenth session's before/after rows ran benchmarks/gateway_cpu.py, which became `bench gateway`, at 824855e
# and cd1de66.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT" && tar xf .whl/site312.txz -C /tmp/site
lscpu | grep -E "^Model name|^CPU\(s\)|^Thread" > "$OUT/lscpu.txt"
for shape in ${SHAPES:-qwen3 mixtral}; do
  case $shape in  # gpu_lockstep.sh's random models' vocabularies; the rest of the model is not read
    qwen3)   model=/tmp/tokenizer_qwen3; vocab="--arch qwen3_moe --vocab-size 151936 --dense-intermediate-size 64" ;;
    mixtral) model=/tmp/tokenizer_mixtral; vocab="--vocab-size 32000" ;;
    *)       model=models/expertmesh-mini; vocab="" ;;
  esac
  [ -z "$vocab" ] || [ -e $model/config.json ] || PYTHONPATH=/tmp/site:$PWD python3 -m expertmesh make-model \
    --out $model --dtype bfloat16 $vocab --hidden-size 64 --num-layers 1 --num-heads 2 --num-kv-heads 1 \
    --head-dim 32 --intermediate-size 32 --num-experts 4 --top-k 2 --max-position-embeddings 1024 > /dev/null
  name=$([ -z "$vocab" ] && echo gateway || echo gateway_$shape)
  for workers in ${WORKERS:-4} $([ "${WORKERS_MORE:-0}" = 0 ] || echo "$WORKERS_MORE"); do
    for clients in ${CLIENT_PROCESSES:-1 4}; do
      echo "== $shape: $workers gateways, $clients client processes" | tee -a "$OUT/bench_gateway.txt"
      PYTHONPATH=/tmp/site:$PWD timeout -k 5 ${ROW_S:-120} python3 -m expertmesh bench gateway --model $model \
        --workers $workers --client-processes $clients --requests ${REQUESTS:-4096} --tokens 96 --concurrency 256 \
        --step-ms ${STEP_MS:-4.5} --repeats ${REPEATS:-2} --json "$OUT/${name}_w${workers}_c${clients}.json" 2>&1 \
        | grep -E "gateway\(s\)|gateway CPU|failed|Error|Traceback" | tee -a "$OUT/bench_gateway.txt"
      pkill -9 -f "m expertmesh[.]gateway --config" 2>/dev/null; true
    done
  done
done
