"""The MLA decode Triton kernel in Triton's interpreter against its torch reference, at small shapes (16-24 heads, a
latent of 64 + a rope key of 16): several sequences of odd lengths, one of a single token, contexts that end on and
just past a block boundary, one split and several (some of them empty), a head count that leaves part of a head tile
empty, a latent rank that is not a power of two, padding sequences and tokens, float32 and bfloat16."""
import pytest
import torch

pytest.importorskip("triton")

from expertmesh.ops.mla import (MLALaunch, choose_mla_launch, mla_attention, mla_decode, mla_decode_reference,
                                mla_decode_triton)
from tests.paged_batch import make_step

RANK, ROPE = 64, 16
Q_LENS = [1, 1, 0, 1, 1, 1]  # a padding sequence among them
SEQ_LENS = [37, 71, 0, 1, 16, 33]  # odd lengths, a single token, a context ending on a block's end, one just past it


def decode_step(num_heads=16, rank=RANK, rope=ROPE, block_size=16, dtype=torch.float32, seed=0, **kw):
    """A decode step over one latent cache: make_step's single kv head of rank + rope values is the latent entry."""
    step = make_step(Q_LENS, SEQ_LENS, num_q_heads=num_heads, num_kv_heads=1, head_dim=rank + rope,
                     block_size=block_size, dtype=dtype, seed=seed, **kw)
    step.write_new_kv()  # new_k: each new token's latent and rope key
    return step


def decode_args(step, rank=RANK):
    return step.q, step.k_cache, rank, step.block_table, step.seq_lens, step.query_start, step.scale


def launch(block_h=16, num_splits=1):
    return MLALaunch(block_h=block_h, block_n=16, num_splits=num_splits, num_warps=4, num_stages=2)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("block_size", [16, 8])
def test_decode_kernel_matches_the_reference(block_size, num_splits):
    # 16 tokens a step: several steps per sequence, tiles that cross blocks; 4 splits of a 1-token sequence: 3 empty
    step = decode_step(block_size=block_size, padding_tokens=2, seed=num_splits)
    out = mla_decode_triton(*decode_args(step), launch=launch(num_splits=num_splits))
    expected = mla_decode_reference(*decode_args(step))
    assert out.shape == (step.q.shape[0], 16, RANK) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert out[-2:].eq(0).all()


@pytest.mark.parametrize("num_splits", [1, 2])
def test_a_partial_head_tile_and_a_rank_that_is_not_a_power_of_two(num_splits):
    step = decode_step(num_heads=24, rank=40, rope=8, padding_tokens=1, seed=5)  # tiles of 16 heads: 16 + 8
    out = mla_decode_triton(*decode_args(step, rank=40), launch=launch(num_splits=num_splits))
    torch.testing.assert_close(out, mla_decode_reference(*decode_args(step, rank=40)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_bfloat16_against_the_reference_in_float32(num_splits):
    """bf16 entries and queries; the reference on the same values in float32 is the truth. The kernel accumulates in
    float32 and rounds the probabilities once to bf16 (the interpreter truncates them: a GPU rounds to nearest)."""
    step = decode_step(dtype=torch.bfloat16, padding_tokens=1, seed=9)
    out = mla_decode_triton(*decode_args(step), launch=launch(num_splits=num_splits))
    assert out.dtype == torch.bfloat16
    args = list(decode_args(step))
    args[:2] = [step.q.float(), step.k_cache.float()]
    torch.testing.assert_close(out.float(), mla_decode_reference(*args), atol=2e-2, rtol=2e-2)


def test_the_dispatcher_with_the_chosen_launch_splits_a_wide_table():
    step = decode_step(extra_table_blocks=60)  # a table of 1040 tokens: wide enough for the chooser to split
    chosen = choose_mla_launch(len(SEQ_LENS), 16, step.block_table.shape[1] * 16, num_sms=132)
    assert chosen.num_splits > 1
    out = mla_decode(*decode_args(step), backend="triton")
    torch.testing.assert_close(out, mla_decode_reference(*decode_args(step)), atol=1e-5, rtol=0)


def test_mla_attention_decodes_through_the_kernel():
    """The absorbed decode path of mla_attention, kv_b_proj folded into the query and the output, on either backend."""
    heads, nope, v_dim = 16, 16, 12
    step = decode_step(num_heads=heads, padding_tokens=2, seed=3)
    gen = torch.Generator().manual_seed(3)
    tokens = step.q.shape[0]
    q_nope, q_rope = torch.randn(tokens, heads, nope, generator=gen), torch.randn(tokens, heads, ROPE, generator=gen)
    kv_b_proj = torch.randn(heads * (nope + v_dim), RANK, generator=gen) / RANK ** 0.5
    args = (q_nope, q_rope, step.k_cache, kv_b_proj, step.block_table, step.seq_lens, step.query_start, 1, 0.2)
    out = mla_attention(*args, backend="triton")
    assert out.shape == (tokens, heads, v_dim) and out[-2:].eq(0).all()
    torch.testing.assert_close(out, mla_attention(*args, backend="reference"), atol=1e-5, rtol=0)


def test_a_step_of_padding_alone_gives_zeros():
    step = make_step([0, 0], [0, 0], num_q_heads=16, num_kv_heads=1, head_dim=RANK + ROPE, block_size=16,
                     padding_tokens=2)
    for num_splits in (1, 2):
        assert mla_decode_triton(*decode_args(step), launch=launch(num_splits=num_splits)).eq(0).all()


def test_tiles_smaller_than_a_dot_are_refused():
    step = decode_step(num_heads=8)
    with pytest.raises(ValueError, match="block_h"):
        mla_decode_triton(*decode_args(step), launch=launch(block_h=8))
