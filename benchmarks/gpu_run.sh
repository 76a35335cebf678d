#!/usr/bin/env bash
# The GPU session of issue 3, run on the device machine (2 GPUs): GPU tests, then a Mixtral-8x7B-shaped
# model (random weights, 2 layers) served with the attention node on GPU 0 and the expert node on GPU 1,
# CUDA tensors over UCX, at m = 1, 2, 3. Logs and JSON land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site && tar xf .whl/site312.txz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c "import torch, ucxx, fastapi, uvloop, zmq, msgpack; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'ucxx', ucxx.__version__)" || exit 1
nvidia-smi topo -m 2>&1 | head -5
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -15
python3 -m expertmesh make-model --out /tmp/tiny --seed 1 >/dev/null
timeout 90 python3 benchmarks/microbatch_sweep.py --model /tmp/tiny --device cuda --transport ucx --microbatches 1 \
  --num-requests 8 --concurrency 8 2>&1 | grep -E "^m=|Error|error" | head -20
time python3 -m expertmesh make-model --out /tmp/mixtral-shape --dtype bfloat16 --hidden-size 4096 --num-layers 2 \
  --num-heads 32 --num-kv-heads 8 --head-dim 128 --intermediate-size 14336 --num-experts 8 --top-k 2 \
  --vocab-size 32000 --max-position-embeddings 1024
timeout 400 python3 benchmarks/microbatch_sweep.py --model /tmp/mixtral-shape --device cuda --transport ucx \
  --dtype bfloat16 --microbatches 1 2 3 --num-requests 128 --concurrency 64 --max-num-seqs 64 \
  --input-len 64 128 --output-len 64 128 --json $OUT/mixtral_sweep.json 2>&1 | grep -vE "INFO|^\s" | tail -30
