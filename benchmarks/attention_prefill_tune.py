"""Prefill tiles of the paged-attention kernel on a GPU: every launch in a small grid (rows per program, warps,
keys per step, pipeline stages) on a chunk of new tokens over a paged cache, beside choose_launch's pick and
PyTorch's SDPA (flash, contiguous K/V) on the same causal prompts, and the matmul floor measured in the same run.

Served at 3.5k-token prompts, a 2048-token prefill step's attention segment took 1.31 ms a layer on an H200
(RESULTS.md, eleventh session), about 5x its FLOPs at the bf16 peak: this finds where the kernel's tiles stand.

    python benchmarks/attention_prefill_tune.py --tokens 2048 --prompt-len 3584 --json out.json
"""
import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from expertmesh.bench.layer import measure_ceilings, time_fn  # noqa: E402
from expertmesh.ops.attention import AttentionLaunch, choose_launch, paged_attention_triton, _num_sms  # noqa: E402


def chunk(tokens: int, prompt_len: int, heads: int, kv_heads: int, dim: int, block_size: int, device: str):
    """The last `tokens` new tokens of one prompt of prompt_len tokens (its first prompt_len - tokens cached), as a
    served chunk of a long prompt is: q [tokens, heads, dim] and a paged cache holding every position."""
    blocks = -(-prompt_len // block_size)
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(blocks, block_size, kv_heads, dim, device=device, generator=g, dtype=torch.bfloat16)
    v = torch.randn(blocks, block_size, kv_heads, dim, device=device, generator=g, dtype=torch.bfloat16)
    q = torch.randn(tokens, heads, dim, device=device, generator=g, dtype=torch.bfloat16)
    table = torch.randperm(blocks, device=device, generator=g).to(torch.int32)[None, :]  # scattered blocks
    seq_lens = torch.tensor([prompt_len], dtype=torch.int32, device=device)
    query_start = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    return q, k, v, table, seq_lens, query_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--prompt-len", type=int, default=3584)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = "cuda"
    _, peak = measure_ceilings(device, torch.bfloat16)
    q, k, v, table, seq_lens, query_start = chunk(args.tokens, args.prompt_len, args.heads, args.kv_heads,
                                                  args.head_dim, args.block_size, device)
    cached = args.prompt_len - args.tokens
    # causal FLOPs: each new token at position p sees p + 1 keys; QK^T and PV, 2 FLOPs a multiply-add
    keys_seen = sum(cached + i + 1 for i in range(args.tokens))
    flops = 4 * keys_seen * args.heads * args.head_dim
    floor_us = flops / peak * 1e6
    scale = 1 / math.sqrt(args.head_dim)
    run = lambda launch: paged_attention_triton(q, k, v, table, seq_lens, query_start, args.tokens, scale,  # noqa
                                                launch)
    chosen = choose_launch(args.tokens, 1, args.heads, args.kv_heads, args.head_dim, args.tokens,
                           table.shape[1] * args.block_size, _num_sms(q.device), 2)
    reference = run(chosen)
    rows = []
    group = args.heads // args.kv_heads
    grid = itertools.product([64 // group, 128 // group, 256 // group], [4, 8], [32, 64, 128], [2, 3])
    for block_q, warps, block_n, stages in grid:
        launch = AttentionLaunch(block_q, block_n, chosen.num_splits, warps, stages)
        try:
            out = run(launch)
            error = (out.float() - reference.float()).abs().max().item()
            us = time_fn(lambda: run(launch), device, reps=20) * 1e6
        except Exception as exc:  # a tile that does not fit shared memory or registers
            rows.append({"launch": launch.__dict__, "error": f"{type(exc).__name__}: {str(exc)[:80]}"})
            continue
        rows.append({"launch": launch.__dict__, "us": us, "ratio": us / floor_us, "max_abs_diff": error,
                     "chosen": launch == chosen})
    # the strongest baseline: SDPA's flash kernel, keys contiguous, on a whole causal prompt of `tokens` tokens
    qs = q.transpose(0, 1)[None]
    ks = k[:1].expand(-(-args.tokens // args.block_size), -1, -1, -1).reshape(-1, args.kv_heads, args.head_dim)
    ks = ks[:args.tokens].transpose(0, 1)[None].repeat_interleave(group, 1).contiguous()
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, ks, is_causal=True)  # noqa
    sdpa_us = time_fn(sdpa, device, reps=20) * 1e6
    sdpa_flops = 4 * (args.tokens * (args.tokens + 1) // 2) * args.heads * args.head_dim
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    print(f"{args.tokens} new tokens of a {args.prompt_len}-token prompt: floor {floor_us:.1f} us "
          f"({flops / 1e9:.1f} GFLOP at {peak / 1e12:.0f} TFLOP/s); SDPA flash, a causal {args.tokens}-token prompt "
          f"(contiguous): {sdpa_us:.1f} us, {sdpa_us / (sdpa_flops / peak * 1e6):.2f}x its floor")
    for r in [r for r in ok if r["chosen"]] + ok[:8]:
        print(f"  {r['launch']}: {r['us']:.1f} us, {r['ratio']:.2f}x floor, max |diff| {r['max_abs_diff']:.2e}"
              f"{'  (chosen now)' if r['chosen'] else ''}")
    print(f"  {len(rows) - len(ok)} launches failed")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "floor_us": floor_us,
                                         "sdpa_us": sdpa_us, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
