"""Decode paged attention on a GPU against its memory floor, for the launch that choose_launch picks and for a sweep
of key tiles, pipeline depths, warps and split counts: the numbers to tune expertmesh/ops/attention.py by.

    python benchmarks/attention_sweep.py [--seqs 64,128,256] [--context 4096] [--quick] [--json out.json]

The floor is every sequence's K and V read once (2 x seqs x context x kv_heads x head_dim x 2 bytes, bf16) at the
copy bandwidth, measured here with a device-to-device copy of the same size."""
import argparse
import itertools
import json

import torch
from triton.testing import do_bench

from expertmesh.ops.attention import AttentionLaunch, choose_launch, paged_attention_triton

SHAPES = {"mixtral": (32, 8, 128), "qwen3": (32, 4, 128)}  # q heads, kv heads, head_dim
BLOCK_SIZE = 16


def decode_inputs(num_seqs: int, context: int, num_q_heads: int, num_kv_heads: int, head_dim: int):
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = num_seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    block_table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(num_seqs, blocks_per_seq)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device="cuda")
    query_start = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(num_seqs, num_q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    return q, k_cache, v_cache, block_table, seq_lens, query_start, 1, head_dim ** -0.5


def copy_bandwidth(num_bytes: int) -> float:
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * num_bytes / (ms * 1e-3)  # read + write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", default="64,128,256")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="only the chosen launch, no sweep")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for shape, num_seqs in itertools.product(SHAPES, [int(s) for s in args.seqs.split(",")]):
        num_q_heads, num_kv_heads, head_dim = SHAPES[shape]
        inputs = decode_inputs(num_seqs, args.context, num_q_heads, num_kv_heads, head_dim)
        floor_bytes = 2 * num_seqs * args.context * num_kv_heads * head_dim * 2
        bandwidth = copy_bandwidth(floor_bytes)
        chosen = choose_launch(num_seqs, num_seqs, num_q_heads, num_kv_heads, head_dim, 1,
                               inputs[3].shape[1] * BLOCK_SIZE, num_sms)
        launches = [chosen]
        if not args.quick:
            launches += [AttentionLaunch(1, block_n, splits, warps, stages) for block_n, splits, warps, stages in
                         itertools.product([32, 64, 128], [1, 2, 4, 8], [4, 8], [2, 3, 4, 5])]
        results = []
        for launch in launches:
            try:
                ms = do_bench(lambda: paged_attention_triton(*inputs, launch=launch), warmup=10, rep=50,
                              return_mode="median")
            except Exception as error:  # out of shared memory for some combinations
                print(f"  {launch}: {type(error).__name__}")
                continue
            results.append((ms, launch))
        floor_ms = floor_bytes / bandwidth * 1e3
        best_ms, best = min(results, key=lambda r: r[0])
        chosen_ms = results[0][0]
        print(f"{shape} {num_seqs} seqs x {args.context}: floor {floor_ms * 1e3:.0f} us ({bandwidth / 1e12:.2f} TB/s "
              f"copy); chosen {chosen} {chosen_ms * 1e3:.0f} us = {chosen_ms / floor_ms:.2f}x; "
              f"best {best} {best_ms * 1e3:.0f} us = {best_ms / floor_ms:.2f}x")
        rows.append({"shape": shape, "num_seqs": num_seqs, "context": args.context, "floor_us": floor_ms * 1e3,
                     "copy_tb_s": bandwidth / 1e12, "chosen": vars(chosen), "chosen_us": chosen_ms * 1e3,
                     "sweep": [{"us": ms * 1e3, **vars(launch)} for ms, launch in results]})
        del inputs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
