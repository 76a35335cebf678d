"""The paged-attention and KV-write Triton kernels in Triton's interpreter against the torch reference, at small
shapes in float32 (the interpreter's dot takes bf16 bit patterns for integers; bf16 is checked in tests/gpu): decode
steps with and without split-KV, prefill tiles, padding sequences and tokens, a padded head_dim; and in float16,
each output the float32 attention of its inputs rounded once, as the reference gives it."""
import pytest
import torch

pytest.importorskip("triton")

from expertmesh.ops.attention import (AttentionLaunch, choose_launch, paged_attention, paged_attention_reference,
                                      paged_attention_triton, write_kv_reference, write_kv_triton)
from tests.paged_batch import make_step

DECODE_Q_LENS = [1, 1, 0, 1]  # a padding sequence among them
DECODE_SEQ_LENS = [37, 70, 0, 1]
MIXED_Q_LENS = [1, 20, 0, 33, 1]  # a decode, a prefill from scratch, padding, a chunked prefill, a decode
MIXED_SEQ_LENS = [30, 20, 0, 70, 5]


def reference_and_triton(step, launch=None):
    step.write_new_kv()
    return paged_attention_reference(*step.attention_args()), paged_attention_triton(*step.attention_args(),
                                                                                     launch=launch)


def test_write_kv_kernel_matches_the_reference():
    step = make_step(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                     padding_tokens=2)
    expected_k, expected_v = step.k_cache.clone(), step.v_cache.clone()
    write_kv_reference(step.new_k, step.new_v, expected_k, expected_v, step.slot_mapping)
    # k as a strided view, as the attention layer's split of one qkv projection gives it
    qkv = torch.cat([step.new_k, step.new_v], dim=1)
    write_kv_triton(qkv[:, :2], qkv[:, 2:], step.k_cache, step.v_cache, step.slot_mapping)
    assert torch.equal(step.k_cache.nan_to_num(-1), expected_k.nan_to_num(-1))
    assert torch.equal(step.v_cache.nan_to_num(-1), expected_v.nan_to_num(-1))


def test_write_kv_kernel_stores_mla_latents_in_one_cache():
    """MLA's write (ops/mla.py): each token's latent and rope key, one tensor given as both caches of the kernel."""
    step = make_step(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=4, num_kv_heads=1, head_dim=72, block_size=16,
                     padding_tokens=2)
    expected = step.k_cache.clone()
    write_kv_reference(step.new_k, step.new_k, expected, expected, step.slot_mapping)
    write_kv_triton(step.new_k, step.new_k, step.k_cache, step.k_cache, step.slot_mapping)
    assert torch.equal(step.k_cache.nan_to_num(-1), expected.nan_to_num(-1))


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("num_kv_heads,block_size", [(2, 16), (1, 8)])
def test_decode_kernel_matches_the_reference(num_kv_heads, block_size, num_splits):
    step = make_step(DECODE_Q_LENS, DECODE_SEQ_LENS, num_q_heads=4, num_kv_heads=num_kv_heads, head_dim=64,
                     block_size=block_size, padding_tokens=2, seed=num_splits)
    # 16 keys a step: several steps per sequence, tiles that cross blocks, splits that are empty
    expected, out = reference_and_triton(step, AttentionLaunch(block_q=1, block_n=16, num_splits=num_splits,
                                                               num_warps=4, num_stages=2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert out[-2:].eq(0).all()


def test_decode_through_the_dispatcher_with_the_chosen_launch():
    step = make_step(DECODE_Q_LENS, DECODE_SEQ_LENS, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                     extra_table_blocks=60)  # a table wide enough (1024 keys) for the chooser to split
    launch = choose_launch(4, 4, 4, 2, 64, max_query_len=1, max_context=step.block_table.shape[1] * 16, num_sms=132,
                           element_bytes=4)
    assert launch.block_q == 1 and launch.num_splits > 1
    step.write_new_kv()
    out = paged_attention(*step.attention_args(), backend="triton")
    torch.testing.assert_close(out, paged_attention_reference(*step.attention_args()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_q,num_splits", [(None, 1), (4, 1), (8, 2), (32, 4)])
def test_prefill_tiles_match_the_reference(block_q, num_splits):
    step = make_step(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=8,
                     padding_tokens=3, seed=7)
    launch = None
    if block_q is not None:
        # small tiles: many per sequence, a partial last one; splits of a causal tile, some rows of which see none
        # of a split's keys
        launch = AttentionLaunch(block_q=block_q, block_n=16, num_splits=num_splits, num_warps=4, num_stages=2)
    expected, out = reference_and_triton(step, launch)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert out[-3:].eq(0).all()


@pytest.mark.parametrize("q_lens,seq_lens,heads,num_splits", [
    (DECODE_Q_LENS, DECODE_SEQ_LENS, (8, 2), 1),  # a group of 4: the decode kernel's three row copies
    (DECODE_Q_LENS, DECODE_SEQ_LENS, (8, 2), 4),  # the same over split-KV
    (DECODE_Q_LENS, DECODE_SEQ_LENS, (16, 2), 1),  # a group of 8: room for two copies, two parts
    (DECODE_Q_LENS, DECODE_SEQ_LENS, (32, 2), 1),  # a group of 16 fills the tile: a second product
    (MIXED_Q_LENS, MIXED_SEQ_LENS, (8, 2), 1)])  # prefill tiles: a product per part, three
def test_half_precision_outputs_are_exact_attention_rounded_once(q_lens, seq_lens, heads, num_splits):
    """The softmax weights enter P.V as 16-bit parts (softmax_parts: 2 or 3), so few outputs differ from float32
    attention rounded once (the torch reference's result). Rounded to 16 bits once, as FlashAttention does, 63-67%
    were equal here."""
    step = make_step(q_lens, seq_lens, *heads, head_dim=64, block_size=16, dtype=torch.float16, seed=1)
    step.write_new_kv()
    args = list(step.attention_args())
    launch = None if num_splits == 1 else AttentionLaunch(block_q=1, block_n=16, num_splits=num_splits, num_warps=4,
                                                          num_stages=2)
    out = paged_attention_triton(*args, launch=launch)
    args[:3] = [t.float() for t in args[:3]]
    exact = paged_attention_reference(*args).to(torch.float16)
    assert (out == exact).float().mean().item() >= 0.99


@pytest.mark.parametrize("q_lens,seq_lens", [([1, 1], [40, 9]), ([12, 1], [12, 30])])
def test_a_head_dim_that_is_not_a_power_of_two(q_lens, seq_lens):
    step = make_step(q_lens, seq_lens, num_q_heads=2, num_kv_heads=1, head_dim=96, block_size=16, seed=3)
    expected, out = reference_and_triton(step)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_a_step_of_padding_alone_gives_zeros():
    step = make_step([0, 0], [0, 0], num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16, padding_tokens=2)
    assert step.max_query_len == 1  # as a CUDA-graph bucket of decodes sees it
    for max_query_len in (0, 1):
        args = list(step.attention_args())
        args[6] = max_query_len
        assert paged_attention_triton(*args).eq(0).all()


def test_query_heads_not_a_multiple_of_kv_heads_are_refused():
    step = make_step([1], [3], num_q_heads=3, num_kv_heads=2, head_dim=16, block_size=8)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_triton(*step.attention_args())
