#!/usr/bin/env bash
# The GPU session of issue 9 on one H200, part 2: served decode end to end (64 requests in flight, bf16, random
# weights), Mixtral-8x7B shape (2 layers) and Qwen3-30B-A3B shape (4 layers): colocated (--expert-nodes 0) and
# disaggregated (attention and expert node on the one GPU under CUDA MPS, UCX cuda_ipc), m = 1 and 2; and
# transformers' generate on the same checkpoints. Logs and JSON in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT" && tar xf .whl/site312.txz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-cuda-mps-control -d && echo "MPS on"
SHAPES=${SHAPES:-"mixtral qwen3"}
for shape in $SHAPES; do
  if [ $shape = mixtral ]; then
    ARGS="--hidden-size 4096 --num-layers 2 --num-heads 32 --num-kv-heads 8 --head-dim 128 --intermediate-size 14336
          --num-experts 8 --top-k 2 --vocab-size 32000"
  else
    ARGS="--arch qwen3_moe --hidden-size 2048 --num-layers 4 --num-heads 32 --num-kv-heads 4 --head-dim 128
          --intermediate-size 768 --dense-intermediate-size 6144 --num-experts 128 --top-k 8 --vocab-size 151936"
  fi
  python3 -m expertmesh make-model --out /tmp/$shape --dtype bfloat16 $ARGS --max-position-embeddings 1024 >/dev/null
  for mode in ${MODES:-0 1}; do
    timeout ${SWEEP_S:-200} python3 benchmarks/microbatch_sweep.py --model /tmp/$shape --device cuda --transport ucx \
      --dtype bfloat16 --expert-nodes $mode --microbatches ${MICROBATCHES:-1 2} --num-requests 128 --concurrency 64 \
      --max-num-seqs 64 --input-len 64 128 --output-len 64 128 --json "$OUT/serve_${shape}_e$mode.json" 2>&1 \
      | grep -E "^m=|Error|error|Traceback" | sed "s/^/$shape expert-nodes=$mode /" | head -20
  done
  [ -n "${HF-1}" ] && timeout 120 python3 benchmarks/hf_generate.py --model /tmp/$shape --json "$OUT/hf_$shape.json" 2>&1 | tail -2
done
echo quit | nvidia-cuda-mps-control
