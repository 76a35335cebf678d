"""Greedy tokens of a cluster on GPUs (attention node on GPU 0, expert nodes on the others, float32) against
transformers on the CPU, for a small random checkpoint of each architecture, over each transport given.

    python benchmarks/gpu_exactness.py --transports ucx,nccl,ipc   # on a machine with >= 2 GPUs
    python benchmarks/gpu_exactness.py --transports ipc --max-batch-tokens 8   # the 12-token prompt in chunks
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import httpx
import torch

from expertmesh.config import Config
from expertmesh.launcher.local import LocalCluster, free_port
from expertmesh.model.make_model import RandomModelShape, make_model

PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 200, 300], [42] * 12, [7]]


def check(arch: str, expert_nodes: int, transport: str, max_batch_tokens: int | None = None) -> bool:
    from transformers import AutoModelForCausalLM
    model_dir = make_model(tempfile.mkdtemp(), RandomModelShape(arch=arch, mlp_only_layers=[1] if arch == "qwen3_moe" else []),
                           seed=4)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    config = Config()
    config.model.path, config.model.device, config.transport.backend = str(model_dir), "cuda", transport
    config.cluster.attention_nodes, config.cluster.expert_nodes = 1, expert_nodes
    config.gateway.port = free_port()
    if max_batch_tokens is not None:  # prompts longer than it prefill in chunks (a step's tokens <= the M2N buffers)
        config.engine.max_batch_tokens = config.engine.max_num_seqs = max_batch_tokens
    cluster = LocalCluster(config)
    try:
        cluster.start()
        cluster.wait_ready()
        ok = True
        with httpx.Client(base_url=cluster.url, timeout=120) as client:
            for prompt in PROMPTS:
                got = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                           "ignore_eos": True, "return_token_ids": True}).json()
                with torch.no_grad():
                    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                                  pad_token_id=0)[0, len(prompt):].tolist()
                same = got["choices"][0]["token_ids"] == expected
                ok &= same
                print(f"{arch} {transport} N={expert_nodes} prompt {prompt[:4]}...: {'identical' if same else 'DIFFERENT'}",
                      flush=True)
        return ok
    finally:
        cluster.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transports", default="ucx", help="comma-separated, of ucx, nccl, ipc")
    p.add_argument("--max-batch-tokens", type=int, help="engine.max_batch_tokens (and max_num_seqs)")
    args = p.parse_args()
    gpus = torch.cuda.device_count()
    results = [check(arch, max(1, gpus - 1), transport, args.max_batch_tokens)
               for transport in args.transports.split(",") for arch in ("mixtral", "qwen3_moe")]
    print("all identical" if all(results) else "MISMATCH")
    sys.exit(0 if all(results) else 1)
