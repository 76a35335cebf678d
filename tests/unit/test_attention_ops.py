"""The paged-attention reference (the CPU path and the kernels' oracle) against attention computed independently:
contiguous keys per sequence and an explicit float64 softmax; the KV-cache write and its padding slots."""
import pytest
import torch
import torch.nn.functional as F

from expertmesh.ops.attention import paged_attention, paged_attention_reference, write_kv, write_kv_reference
from tests.paged_batch import dense_attention, make_step

# decode steps, a prefill from scratch, a chunked prefill over cached tokens, a padding sequence in the middle,
# a one-token sequence and padding tokens at the end
MIXED_Q_LENS = [1, 7, 1, 0, 19, 1, 5]
MIXED_SEQ_LENS = [33, 7, 1, 0, 50, 64, 40]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_reference_matches_dense_attention_on_shuffled_blocks(group, head_dim, block_size):
    step = make_step(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=2 * group, num_kv_heads=2, head_dim=head_dim,
                     block_size=block_size, padding_tokens=3, seed=group + head_dim + block_size)
    write_kv(step.new_k, step.new_v, step.k_cache, step.v_cache, step.slot_mapping)
    out = paged_attention_reference(*step.attention_args())
    assert out.dtype == step.q.dtype and out.shape == step.q.shape
    torch.testing.assert_close(out.double(), dense_attention(step), atol=2e-6, rtol=0)
    assert out[-3:].eq(0).all()  # padding tokens' rows


def test_reference_of_a_pure_decode_step_with_padding_sequences():
    step = make_step([1, 1, 0, 1, 0, 0], [70, 1, 0, 16, 0, 0], num_q_heads=8, num_kv_heads=2, head_dim=64,
                     block_size=16, padding_tokens=3, seed=5)
    step.write_new_kv()
    out = paged_attention(*step.attention_args())  # CPU tensors: the reference
    torch.testing.assert_close(out.double(), dense_attention(step), atol=2e-6, rtol=0)


def test_write_kv_stores_each_token_at_its_slot_and_skips_padding():
    num_blocks, block_size, heads, dim = 4, 8, 2, 16
    k_cache = torch.full((num_blocks, block_size, heads, dim), -7.0)
    v_cache = torch.full_like(k_cache, -7.0)
    k, v = torch.randn(5, heads, dim), torch.randn(5, heads, dim)
    slots = torch.tensor([9, -1, 0, 31, -1])  # -1 would be the last slot if taken as an index
    write_kv_reference(k, v, k_cache, v_cache, slots)
    for token, slot in [(0, 9), (2, 0), (3, 31)]:
        assert torch.equal(k_cache[slot // block_size, slot % block_size], k[token])
        assert torch.equal(v_cache[slot // block_size, slot % block_size], v[token])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[[9, 0, 31]] = False
    assert k_cache.view(-1, heads, dim)[untouched].eq(-7.0).all()
    assert v_cache.view(-1, heads, dim)[untouched].eq(-7.0).all()


def test_reference_is_bitwise_the_contiguous_cache_attention_of_model_layers():
    """What model/layers.py computed on its [slots, max_len] cache before the paged cache, in bf16: the same SDPA
    calls on the same values, so exactness against transformers carries over."""
    step = make_step([1, 6, 1], [20, 6, 45], num_q_heads=8, num_kv_heads=2, head_dim=128, block_size=16,
                     dtype=torch.bfloat16, seed=11)  # scale head_dim ** -0.5, SDPA's default 1 / sqrt(head_dim)
    step.write_new_kv()
    out = paged_attention_reference(*step.attention_args())
    starts = step.query_start.tolist()
    for s, context in enumerate(step.seq_lens.tolist()):
        start, end = starts[s], starts[s + 1]
        new = end - start
        k_seq, v_seq = step.keys[s].transpose(0, 1), step.values[s].transpose(0, 1)
        mask = None if new == 1 else torch.ones(new, context, dtype=torch.bool).tril(diagonal=context - new)
        expected = F.scaled_dot_product_attention(step.q[start:end].transpose(0, 1), k_seq, v_seq, attn_mask=mask,
                                                  enable_gqa=True).transpose(0, 1)
        assert torch.equal(out[start:end], expected)


def test_an_unknown_backend_is_refused():
    step = make_step([1], [3], num_q_heads=2, num_kv_heads=1, head_dim=16, block_size=8)
    with pytest.raises(ValueError, match="cuda-graph"):
        paged_attention(*step.attention_args(), backend="cuda-graph")


def test_mla_absorbed_decode_equals_expanded_attention():
    """MLA at decode folds kv_b_proj into the query and the output (attention over the latents themselves); the
    expanded path builds per-head keys and values from the latents first, as transformers does. Same result."""
    from expertmesh.ops.mla import mla_attention, mla_attention_expanded
    heads, rank, rope, nope, v_dim = 4, 24, 8, 16, 12
    step = make_step([1, 1, 0, 1], [40, 1, 0, 17], num_q_heads=heads, num_kv_heads=1, head_dim=rank + rope,
                     block_size=16, padding_tokens=2, seed=3)
    step.write_new_kv()  # new_k: each token's latent and rope key, the one MLA cache tensor
    gen = torch.Generator().manual_seed(3)
    tokens = step.q.shape[0]
    q_nope, q_rope = torch.randn(tokens, heads, nope, generator=gen), torch.randn(tokens, heads, rope, generator=gen)
    kv_b_proj = torch.randn(heads * (nope + v_dim), rank, generator=gen) / rank ** 0.5
    args = (step.k_cache, kv_b_proj, step.block_table, step.seq_lens, step.query_start)
    absorbed = mla_attention(q_nope, q_rope, *args, 1, 0.2)
    expanded = mla_attention_expanded(q_nope, q_rope, *args, 0.2)
    assert absorbed.shape == (tokens, heads, v_dim) and absorbed[-2:].eq(0).all()
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=0)


def test_the_ops_load_and_run_their_references_without_triton():
    """A CPU install without triton (it is not a dependency off Linux x86_64) imports every op module, and the
    reference path works; asking for the Triton backend says what is missing."""
    import subprocess
    import sys
    code = """
import sys
sys.modules["triton"] = sys.modules["triton.language"] = None  # as if not installed
import torch
from expertmesh.ops import attention, clock, fused_moe, mla, norm, rotary
x, w = torch.randn(3, 8), torch.ones(8)
assert torch.equal(norm.rms_norm(x, w, 1e-6), norm.rms_norm_reference(x, w, 1e-6))
try:
    norm.rms_norm(x, w, 1e-6, backend="triton")
except ImportError as exc:
    assert "needs the triton package" in str(exc)
else:
    raise AssertionError("the triton backend ran without triton")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("element_size,decode,group_pad,block_m,expected", [
    (4, True, 2, 16, (1, 1)),    # float32: the weights enter P.V as they are
    (2, True, 2, 16, (3, 3)),    # the shipped model's groups of 2: three copies in the 16-row decode tile
    (2, True, 4, 16, (3, 3)),    # Mixtral's groups of 4: still one product
    (2, True, 8, 16, (2, 2)),    # Qwen3's groups of 8: two copies fit, a third product would cost 16-19%
    (2, True, 16, 16, (2, 1)),   # a group filling the tile: two products
    (2, False, 8, 64, (3, 1)),   # prompts: a product per part
])
def test_softmax_parts_keep_float32s_bits_where_the_decode_tile_has_room(element_size, decode, group_pad, block_m,
                                                                         expected):
    """(parts, copies) of the kernel's P.V product: 3 parts (float32's 24 bits) unless a decode tile has no room
    for 3 copies of its group's rows; `fixed` sets the parts on every path (the measurement's two arms)."""
    from expertmesh.ops.attention import softmax_parts
    assert softmax_parts(element_size, decode, group_pad, block_m) == expected
    assert softmax_parts(2, True, 8, 16, fixed=3) == (3, 1)
    assert softmax_parts(2, True, 4, 16, fixed=2) == (2, 2)
