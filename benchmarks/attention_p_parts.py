"""What the softmax weights' third 16-bit part costs the paged-attention kernel (ops/attention.py, softmax_parts)
and what it buys: decode at the Mixtral and Qwen3 heads (64 and 256 sequences x 4096 keys) against its memory floor,
a 2048-token prefill chunk of a 3584-token prompt against its bf16 matmul floor, each with 2 and 3 parts on every
path (`fixed`; the shipped rule keeps 2 on a decode tile with no room for 3 copies, Qwen3's groups of 8) in the same
run (alternating, median of 5 rounds), and the share of outputs equal to float32 attention rounded once.

    python benchmarks/attention_p_parts.py
"""
import functools
import math
import statistics
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_prefill_tune import chunk  # noqa: E402
from attention_sweep import copy_bandwidth, decode_inputs  # noqa: E402
from expertmesh.bench.layer import measure_ceilings  # noqa: E402
from expertmesh.ops import attention  # noqa: E402

SHIPPED = attention.softmax_parts


def float32_rounded(q, k, v, table, seq_lens, query_start, max_query_len, scale):
    """The torch reference on float32 copies of the inputs, rounded once to bf16."""
    return attention.paged_attention_reference(q.float(), k.float(), v.float(), table, seq_lens, query_start,
                                               max_query_len, scale).to(q.dtype)


def compare(label: str, inputs: tuple, floor_us: float) -> None:
    exact = float32_rounded(*inputs)
    times = {2: [], 3: []}
    equal = {}
    for _ in range(5):
        for parts in (2, 3):
            attention.softmax_parts = functools.partial(SHIPPED, fixed=parts)
            fn = lambda: attention.paged_attention_triton(*inputs)  # noqa: E731
            equal[parts] = (fn() == exact).float().mean().item()
            times[parts].append(do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3)
    two, three = (statistics.median(times[p]) for p in (2, 3))
    print(f"| {label} | {floor_us:.1f} | {two:.1f} ({two / floor_us:.2f}x) | {three:.1f} ({three / floor_us:.2f}x) | "
          f"{three / two - 1:+.1%} | {equal[2]:.4f} / {equal[3]:.4f} |")


def main() -> None:
    print("| case | floor us | 2 parts us | 3 parts us | cost | equal to float32 rounded once, 2 / 3 parts |")
    print("|---|---|---|---|---|---|")
    for shape, (heads, kv_heads, dim) in {"mixtral": (32, 8, 128), "qwen3": (32, 4, 128)}.items():
        for seqs in (64, 256):
            inputs = decode_inputs(seqs, 4096, heads, kv_heads, dim)
            kv_bytes = 2 * seqs * 4096 * kv_heads * dim * 2
            compare(f"decode {shape} {seqs} x 4096", inputs, kv_bytes / copy_bandwidth(kv_bytes) * 1e6)
    _, peak = measure_ceilings("cuda", torch.bfloat16)
    tokens, prompt_len, heads, kv_heads, dim = 2048, 3584, 32, 4, 128
    q, k, v, table, seq_lens, query_start = chunk(tokens, prompt_len, heads, kv_heads, dim, 16, "cuda")
    keys_seen = sum(prompt_len - tokens + i + 1 for i in range(tokens))
    compare(f"prefill qwen3 {tokens} of {prompt_len}", (q, k, v, table, seq_lens, query_start, tokens,
                                                       1 / math.sqrt(dim)), 4 * keys_seen * heads * dim / peak * 1e6)


if __name__ == "__main__":
    main()
