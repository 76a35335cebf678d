"""The RMSNorm and rotary/KV-write Triton kernels in Triton's interpreter against their torch references, at small
shapes, in float32 and bfloat16: rows and strided heads, the residual add, a padded hidden and head_dim, GQA groups
and head counts that leave part of a program's tile empty, padding tokens, the Qwen3 q/k norm.

The interpreter rounds float32 -> bfloat16 by truncation where a GPU rounds to nearest even (as torch does), so the
bfloat16 cases run with that one cast mended: then the kernels' roundings are the reference's, and without a
norm the results are bitwise equal (a norm's sum may round differently: one bfloat16 step at most)."""
import pytest
import torch

pytest.importorskip("triton")

from expertmesh.model.rotary import RotaryTable
from expertmesh.model.spec import Rope
from expertmesh.ops.norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from expertmesh.ops.rotary import rotate_and_write_kv, rotate_and_write_kv_reference

DTYPES = [torch.float32, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("round_to_nearest_even_in_the_interpreter")  # tests/kernels/conftest.py


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_normed_close(out, expected):
    """float32: a few ulps (another summation order); bfloat16: one rounding step apart at most."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if expected.dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), expected.float(), atol=1e-5, rtol=2 ** -7)
    else:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 96), (3, 256), (64,)])
def test_rms_norm_kernel_on_rows(shape, dtype):
    x, weight = randn(*shape, dtype=dtype) * 3, randn(shape[-1], dtype=dtype, seed=1)
    out = rms_norm(x, weight, 1e-6, backend="triton")
    assert_normed_close(out, rms_norm_reference(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_kernel_on_heads_inside_qkv_rows(dtype):
    """Qwen3's q norm: [tokens, heads, head_dim] strided by the qkv row, more rows than one program takes."""
    heads = randn(9, 24 * 64, dtype=dtype)[:, 64:21 * 64].view(9, 20, 64)
    weight = randn(64, dtype=dtype, seed=1)
    out = rms_norm(heads, weight, 1e-6, backend="triton")
    assert out.is_contiguous()
    assert_normed_close(out, rms_norm_reference(heads, weight, 1e-6))


def test_rms_norm_kernel_promotes_to_a_float32_weight():
    x, weight = randn(4, 128, dtype=torch.bfloat16), randn(128, seed=1)
    out = rms_norm(x, weight, 1e-5, backend="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-5), atol=1e-6, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 200), (4, 3, 64)])
def test_add_rms_norm_kernel(shape, dtype):
    x, residual = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=1)
    weight = randn(shape[-1], dtype=dtype, seed=2)
    normed, summed = add_rms_norm(x, residual, weight, 1e-6, backend="triton")
    expected_normed, expected_summed = add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(summed, expected_summed)
    assert_normed_close(normed, expected_normed)


def test_norm_kernels_with_no_rows():
    x, weight = torch.zeros(0, 32), torch.ones(32)
    assert rms_norm(x, weight, 1e-6, backend="triton").shape == (0, 32)
    normed, summed = add_rms_norm(x, x, weight, 1e-6, backend="triton")
    assert normed.shape == summed.shape == (0, 32)


def qkv_step(num_heads, num_kv_heads, head_dim, dtype, qk_norm, tokens=5, block_size=8, num_blocks=4, seed=0):
    table = RotaryTable(Rope(10000.0), head_dim, 40, dtype, "cpu")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = randn(tokens, width + 8, dtype=dtype, seed=seed)[:, :width]  # rows strided
    positions = torch.tensor([0, 39, 4, 17, 0, 9, 3][:tokens])
    slot_mapping = torch.tensor([5, 31, -1, 0, -1, 12, 20][:tokens])  # padding tokens among them
    norms = ((randn(head_dim, dtype=dtype, seed=seed + 1), randn(head_dim, dtype=dtype, seed=seed + 2)) if qk_norm
             else (None, None))
    cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    return (qkv, positions, table.cos, table.sin), cache, slot_mapping, norms


def run_both(num_heads, num_kv_heads, head_dim, dtype, qk_norm, **kw):
    inputs, cache, slot_mapping, norms = qkv_step(num_heads, num_kv_heads, head_dim, dtype, qk_norm, **kw)
    caches = [cache.clone() for _ in range(4)]
    q = rotate_and_write_kv(*inputs, caches[0], caches[1], slot_mapping, num_heads, num_kv_heads, *norms, 1e-6,
                            backend="triton")
    expected = rotate_and_write_kv_reference(*inputs, caches[2], caches[3], slot_mapping, num_heads, num_kv_heads,
                                             *norms, 1e-6)
    assert q.shape == expected.shape and q.is_contiguous()
    return q, expected, caches


# (q heads, kv heads, head_dim): GQA groups of 4, 1 and 8; 12 heads: a second program of q heads with 4 of 8 rows
# empty; head_dim 96: half a head padded from 48 to 64 lanes
HEADS = [(8, 2, 64), (4, 4, 128), (8, 1, 64), (12, 12, 64), (6, 2, 96)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEADS)
def test_rotary_kernel_without_norm_is_bitwise_the_reference(num_heads, num_kv_heads, head_dim, dtype):
    q, expected, caches = run_both(num_heads, num_kv_heads, head_dim, dtype, qk_norm=False)
    assert torch.equal(q, expected)
    assert torch.equal(caches[0].nan_to_num(-9.0), caches[2].nan_to_num(-9.0))  # padding tokens' slots untouched
    assert torch.equal(caches[1].nan_to_num(-9.0), caches[3].nan_to_num(-9.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(8, 2, 64), (4, 4, 128), (6, 2, 96)])
def test_rotary_kernel_with_the_qwen3_norm(num_heads, num_kv_heads, head_dim, dtype):
    q, expected, caches = run_both(num_heads, num_kv_heads, head_dim, dtype, qk_norm=True)
    # the norm's sum may round differently: a step of the normed value, which the rotation's cancellation can leave
    # next to a small result (absolute); in practice these cases come out bitwise equal in bfloat16
    tolerance = {"atol": 2 ** -6, "rtol": 2 ** -7} if dtype == torch.bfloat16 else {"atol": 4e-6, "rtol": 1e-6}
    torch.testing.assert_close(q, expected, **tolerance)
    assert torch.equal(caches[0].isnan(), caches[2].isnan())
    torch.testing.assert_close(caches[0].nan_to_num(-9.0), caches[2].nan_to_num(-9.0), **tolerance)
    assert torch.equal(caches[1].nan_to_num(-9.0), caches[3].nan_to_num(-9.0))  # v is copied, not normed


def test_rotary_kernel_with_no_tokens():
    inputs, cache, _, _ = qkv_step(4, 2, 64, torch.float32, qk_norm=False)
    empty = [t[:0] for t in inputs[:2]] + list(inputs[2:])
    q = rotate_and_write_kv(*empty, cache, cache.clone(), torch.zeros(0, dtype=torch.long), 4, 2, backend="triton")
    assert q.shape == (0, 4, 64)


def test_rotary_kernel_refuses_mixed_dtypes():
    inputs, cache, slot_mapping, _ = qkv_step(4, 2, 64, torch.bfloat16, qk_norm=False)
    qkv, positions, cos, sin = inputs
    with pytest.raises(ValueError, match="dtype"):
        rotate_and_write_kv(qkv, positions, cos.float(), sin.float(), cache, cache.clone(), slot_mapping, 4, 2,
                            backend="triton")
