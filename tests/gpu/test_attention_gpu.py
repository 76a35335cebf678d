"""The paged-attention and KV-write Triton kernels on a GPU against the torch reference at serving sizes (bf16 and
fp32, decode with and without split-KV, mixed prefill), captured in a CUDA graph, with no host sync, and the decode
kernel's time against the memory floor."""
import random

import pytest
import torch

from expertmesh.ops.attention import (AttentionLaunch, choose_launch, paged_attention, paged_attention_reference,
                                      paged_attention_triton, write_kv)
from tests.paged_batch import make_step

pytestmark = pytest.mark.gpu

SHAPES = {"mixtral": (32, 8, 128), "qwen3": (32, 4, 128)}  # q heads, kv heads, head_dim
COPY_BANDWIDTH = 4.3e12  # bytes/s, the H200's measured device-to-device copy rate


def decode_step(shape, num_seqs, max_context, dtype, seed=0, **kw):
    rng = random.Random(seed)
    seq_lens = [max_context] + [rng.randint(1, max_context) for _ in range(num_seqs - 1)]
    num_q_heads, num_kv_heads, head_dim = SHAPES[shape]
    return make_step([1] * num_seqs, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size=16, dtype=dtype,
                     device="cuda", seed=seed, **kw)


def reference_fp32(step):
    """The reference on the same values in float32, so bf16 results are judged against exact attention."""
    args = list(step.attention_args())
    args[:3] = [t.float() for t in args[:3]]
    return paged_attention_reference(*args)


def tolerance(dtype):
    return {"atol": 1e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_matches_the_reference(shape, dtype):
    step = decode_step(shape, num_seqs=64, max_context=4096, dtype=dtype, padding_tokens=3)
    write_kv(step.new_k, step.new_v, step.k_cache, step.v_cache, step.slot_mapping)
    expected = reference_fp32(step)
    out = paged_attention(*step.attention_args())
    torch.testing.assert_close(out.float(), expected, **tolerance(dtype))
    assert out[-3:].eq(0).all()
    for num_splits in (1, 8):  # both sides of the split-KV choice
        forced = AttentionLaunch(block_q=1, block_n=64, num_splits=num_splits, num_warps=4, num_stages=2)
        torch.testing.assert_close(paged_attention_triton(*step.attention_args(), launch=forced).float(), expected,
                                   **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mixed_prefill_and_decode_match_the_reference(shape, dtype):
    rng = random.Random(1)
    # prefills from scratch, chunks over cached context, decodes, two padding sequences
    q_lens = [512, 300, 1000, 17, 1] + [1] * 40 + [0, 0]
    seq_lens = [512, 2000, 1000, 4096, 3000] + [rng.randint(1, 4096) for _ in range(40)] + [0, 0]
    num_q_heads, num_kv_heads, head_dim = SHAPES[shape]
    step = make_step(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size=16, dtype=dtype,
                     device="cuda", padding_tokens=5, seed=2)
    write_kv(step.new_k, step.new_v, step.k_cache, step.v_cache, step.slot_mapping)
    expected = reference_fp32(step)
    out = paged_attention(*step.attention_args())
    torch.testing.assert_close(out.float(), expected, **tolerance(dtype))
    assert out[-5:].eq(0).all()
    split = AttentionLaunch(block_q=8, block_n=64, num_splits=4, num_warps=4, num_stages=2)  # split causal tiles
    torch.testing.assert_close(paged_attention_triton(*step.attention_args(), launch=split).float(), expected,
                               **tolerance(dtype))


@pytest.mark.parametrize("q_lens,heads", [([1] * 64, (32, 8)), ([1] * 64, (32, 4)), ([1] * 64, (64, 4)),
                                           ([300, 17, 1, 1, 1, 1], (32, 4))])
def test_bf16_output_is_exact_attention_rounded_once(q_lens, heads):
    """bf16 in, each output the float32 attention of those bf16 values rounded once, as the torch reference (SDPA)
    gives it: the softmax weights reach the P.V product with 16 or 24 bits (2 or 3 parts, softmax_parts), so
    rounding them is rarely what decides an output's last bit. Groups of 4 take the decode kernel's three row
    copies, 8 two, 16 a second product; the prefill rows a product per part (3)."""
    rng = random.Random(3)
    seq_lens = [max(q, rng.randint(1, 4096)) for q in q_lens]
    step = make_step(q_lens, seq_lens, *heads, 128, block_size=16, dtype=torch.bfloat16, device="cuda", seed=4)
    write_kv(step.new_k, step.new_v, step.k_cache, step.v_cache, step.slot_mapping)
    exact = reference_fp32(step).to(torch.bfloat16)
    same = (paged_attention(*step.attention_args()) == exact).float().mean().item()
    reference = (paged_attention_reference(*step.attention_args()) == exact).float().mean().item()
    print(f"\n{heads}, q_lens {q_lens[:6]}: {same:.4f} of outputs equal float32 attention rounded once "
          f"(the reference: {reference:.4f})")
    assert same >= 0.98


@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_other_block_sizes_and_head_dims(block_size):
    for head_dim in (64, 96):
        step = make_step([1, 40, 1], [700, 40, 3], 16, 2, head_dim, block_size=block_size, dtype=torch.bfloat16,
                         device="cuda", seed=block_size)
        write_kv(step.new_k, step.new_v, step.k_cache, step.v_cache, step.slot_mapping)
        torch.testing.assert_close(paged_attention(*step.attention_args()).float(), reference_fp32(step),
                                   **tolerance(torch.bfloat16))


def test_a_decode_step_replays_in_a_cuda_graph_with_new_metadata():
    """A bucket of 8 sequences and 8 tokens: 5 real decodes, 3 padding sequences, 3 padding tokens; each replay
    takes new lengths, block tables, queries and keys copied into the captured buffers."""
    def bucket(seed):
        rng = random.Random(seed)
        return make_step([1] * 5 + [0] * 3, [rng.randint(1, 2048) for _ in range(5)] + [0] * 3, 32, 8, 128,
                         block_size=16, dtype=torch.bfloat16, device="cuda", padding_tokens=3, num_blocks=800,
                         table_width=128, seed=seed)

    static = bucket(0)

    def run():
        write_kv(static.new_k, static.new_v, static.k_cache, static.v_cache, static.slot_mapping)
        return paged_attention(*static.attention_args())

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (1, 2, 3):
        step = bucket(seed)
        for name in ("q", "new_k", "new_v", "slot_mapping", "k_cache", "v_cache", "block_table", "seq_lens",
                     "query_start"):
            getattr(static, name).copy_(getattr(step, name))
        graph.replay()
        step.write_new_kv()
        torch.testing.assert_close(out.float(), reference_fp32(step), **tolerance(torch.bfloat16))


def test_no_host_sync():
    decode = decode_step("qwen3", num_seqs=16, max_context=1024, dtype=torch.bfloat16, padding_tokens=2)
    mixed = make_step([100, 1, 0], [300, 50, 0], 32, 4, 128, block_size=16, dtype=torch.bfloat16, device="cuda")
    steps = (decode, mixed)
    for step in steps:  # compiles the kernels
        write_kv(step.new_k, step.new_v, step.k_cache, step.v_cache, step.slot_mapping)
        paged_attention(*step.attention_args())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps:
            write_kv(step.new_k, step.new_v, step.k_cache, step.v_cache, step.slot_mapping)
            paged_attention(*step.attention_args())
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("num_seqs", [64, 128, 256])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_runs_near_the_memory_floor(shape, num_seqs):
    """Reading every sequence's K and V once at the copy bandwidth is the floor; the target is 1.5x of it."""
    from triton.testing import do_bench
    num_q_heads, num_kv_heads, head_dim = SHAPES[shape]
    step = make_step([1] * num_seqs, [4096] * num_seqs, num_q_heads, num_kv_heads, head_dim, block_size=16,
                     dtype=torch.bfloat16, device="cuda")
    step.write_new_kv()
    args = step.attention_args()
    ms = do_bench(lambda: paged_attention(*args), warmup=25, rep=200, return_mode="median")
    floor_bytes = 2 * num_seqs * 4096 * num_kv_heads * head_dim * 2
    floor_ms = floor_bytes / COPY_BANDWIDTH * 1e3
    launch = choose_launch(num_seqs, num_seqs, num_q_heads, num_kv_heads, head_dim, 1,
                           step.block_table.shape[1] * 16, torch.cuda.get_device_properties(0).multi_processor_count)
    print(f"\n{shape} {num_seqs} seqs x 4096: {ms * 1e3:.0f} us, floor {floor_ms * 1e3:.0f} us "
          f"({ms / floor_ms:.2f}x, {floor_bytes / ms / 1e9:.0f} GB/s), {launch}")
    assert ms <= 1.5 * floor_ms
