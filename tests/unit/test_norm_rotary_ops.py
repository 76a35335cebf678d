"""The references of the fused attention-side ops (ops/norm.py, ops/rotary.py, ops/router.py) against the separate
ops of model/layers.py they replace, bitwise (so exactness against transformers carries over), and rotary against
a rotation computed independently in float64."""
import pytest
import torch

from expertmesh.model.layers import rms_norm as layers_rms_norm, route as layers_route
from expertmesh.model.rotary import RotaryTable
from expertmesh.model.spec import Rope
from expertmesh.ops.attention import write_kv_reference
from expertmesh.ops.backend import pick_backend
from expertmesh.ops.norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from expertmesh.ops.rotary import apply_rotary_reference, rotate_and_write_kv
from expertmesh.ops.router import route, route_fused, route_reference

DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_bitwise_the_layers_norm_on_rows_and_on_strided_heads(dtype):
    x, weight = randn(7, 96, dtype=dtype), randn(96, dtype=dtype, seed=1)
    assert torch.equal(rms_norm_reference(x, weight, 1e-6), layers_rms_norm(x, weight, 1e-6))
    assert torch.equal(rms_norm(x, weight, 1e-6), layers_rms_norm(x, weight, 1e-6))  # CPU: the reference
    heads = randn(5, 10 * 64, dtype=dtype, seed=2)[:, 64:7 * 64].view(5, 6, 64)  # q's heads inside a qkv row
    head_weight = randn(64, dtype=dtype, seed=3)
    assert torch.equal(rms_norm(heads, head_weight, 1e-6), layers_rms_norm(heads, head_weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_is_the_residual_add_then_the_layers_norm(dtype):
    h, out, weight = randn(6, 64, dtype=dtype), randn(6, 64, dtype=dtype, seed=1), randn(64, dtype=dtype, seed=2)
    summed = h + out  # the runner's residual update, in its order
    for normed, new_h in (add_rms_norm_reference(out, h, weight, 1e-5), add_rms_norm(out, h, weight, 1e-5)):
        assert torch.equal(new_h, summed)
        assert torch.equal(normed, layers_rms_norm(summed, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rotary_is_bitwise_the_rotary_table(dtype):
    table = RotaryTable(Rope(10000.0), 64, 50, dtype, "cpu")
    x, positions = randn(5, 3, 64, dtype=dtype), torch.tensor([0, 1, 49, 7, 7])
    assert torch.equal(apply_rotary_reference(x, table.cos, table.sin, positions), table.apply(x, positions))


def test_rotary_rotates_each_pair_of_halves_by_position_times_frequency():
    head_dim, theta = 32, 500.0
    table = RotaryTable(Rope(theta), head_dim, 40, torch.float32, "cpu")
    x, positions = randn(4, 2, head_dim), torch.tensor([0, 3, 39, 11])
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = positions.double()[:, None, None] * inv_freq  # [tokens, 1, half]
    first, second = x.double().chunk(2, dim=-1)  # pair i is (x[i], x[i + half])
    expected = torch.cat([first * angle.cos() - second * angle.sin(), first * angle.sin() + second * angle.cos()], -1)
    torch.testing.assert_close(apply_rotary_reference(x, table.cos, table.sin, positions).double(), expected,
                               atol=1e-5, rtol=0)


def layers_composition(qkv, positions, table, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, q_norm,
                       k_norm, eps):
    """What model/layers.py::attention did before the fusion, from the qkv projection to the cache write."""
    tokens, head_dim = qkv.shape[0], table.cos.shape[-1]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k, v = q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim), v.view(tokens, num_kv_heads,
                                                                                                    head_dim)
    if q_norm is not None:
        q, k = layers_rms_norm(q, q_norm, eps), layers_rms_norm(k, k_norm, eps)
    q, k = table.apply(q, positions), table.apply(k, positions)
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    return q


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["mixtral", "qwen3"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(8, 2, 64), (4, 4, 128), (8, 1, 64)])
def test_rotate_and_write_kv_is_bitwise_the_layers_composition(num_heads, num_kv_heads, head_dim, qk_norm, dtype):
    tokens, block_size, num_blocks = 6, 8, 5
    table = RotaryTable(Rope(10000.0), head_dim, 64, dtype, "cpu")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = randn(tokens, width + 16, dtype=dtype)[:, :width]  # rows strided, as a slice of a wider output
    positions = torch.tensor([5, 0, 63, 17, 0, 2])
    slot_mapping = torch.tensor([3, -1, 39, 8, -1, 21])  # two padding tokens
    norms = (randn(head_dim, dtype=dtype, seed=1), randn(head_dim, dtype=dtype, seed=2)) if qk_norm else (None, None)
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype) for _ in range(4)]
    q = rotate_and_write_kv(qkv, positions, table.cos, table.sin, caches[0], caches[1], slot_mapping, num_heads,
                            num_kv_heads, *norms, 1e-6)
    expected = layers_composition(qkv, positions, table, caches[2], caches[3], slot_mapping, num_heads, num_kv_heads,
                                  *norms, 1e-6)
    assert q.shape == (tokens, num_heads, head_dim) and q.is_contiguous()
    assert torch.equal(q, expected)
    assert torch.equal(caches[0].nan_to_num(-9.0), caches[2].nan_to_num(-9.0))  # untouched slots stay NaN
    assert torch.equal(caches[1].nan_to_num(-9.0), caches[3].nan_to_num(-9.0))
    assert caches[0].isnan().sum() == caches[0].numel() - 4 * num_kv_heads * head_dim  # 4 real tokens written


def test_rotate_and_write_kv_takes_both_norms_or_neither():
    table = RotaryTable(Rope(10000.0), 64, 8, torch.float32, "cpu")
    cache = torch.zeros(1, 8, 1, 64)
    with pytest.raises(ValueError, match="both"):
        rotate_and_write_kv(torch.zeros(1, 3 * 64), torch.zeros(1, dtype=torch.long), table.cos, table.sin, cache,
                            cache.clone(), torch.zeros(1, dtype=torch.long), 1, 1, torch.ones(64), None)


def test_unknown_backends_are_refused():
    with pytest.raises(ValueError, match="backend"):
        pick_backend(torch.device("cpu"), "cuda", "rms_norm")
    with pytest.raises(ValueError, match="backend"):
        route(torch.zeros(1, 4), torch.zeros(2, 4), 1, False, backend="triton")


def same_choice(ids, expected_ids, logits):
    """The same experts up to the order of tied logits: the chosen logits agree position by position."""
    return torch.equal(logits.gather(1, ids.long()), logits.gather(1, expected_ids.long()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (128, 8)])
def test_fused_route_chooses_the_same_experts_with_the_same_weights(num_experts, top_k, norm_topk_prob, dtype):
    x, router = randn(33, 64, dtype=dtype), randn(num_experts, 64, dtype=dtype, seed=1) * 0.3
    ids, weights = route_fused(x, router, top_k, norm_topk_prob)
    expected_ids, expected_weights = route_reference(x, router, top_k, norm_topk_prob)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.shape == (33, top_k)
    assert same_choice(ids, expected_ids, (x @ router.T).float())
    torch.testing.assert_close(weights, expected_weights, atol=1e-7, rtol=1e-6)
    if norm_topk_prob:
        torch.testing.assert_close(weights.sum(-1), torch.ones(33), atol=1e-6, rtol=0)
    # on the CPU, "auto" is the reference: bitwise today's route
    for got, want in zip(route(x, router, top_k, norm_topk_prob), layers_route(x, router, top_k, norm_topk_prob)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("groups, top_groups, norm_topk_prob", [(4, 2, True), (1, 1, True), (8, 3, False)])
def test_grouped_sigmoid_route_is_transformers_deepseek_router(groups, top_groups, norm_topk_prob):
    """route_grouped against transformers' DeepseekV3TopkRouter on the same weights: the same experts (as sets: both
    take the top k unsorted) and the same weights, with a bias large enough to change choices."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from expertmesh.ops.router import route_grouped
    config = DeepseekV3Config(hidden_size=32, n_routed_experts=64, num_experts_per_tok=6, n_group=groups,
                              topk_group=top_groups, norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(config)
    gen = torch.Generator().manual_seed(groups)
    with torch.no_grad():
        router.weight.copy_(torch.randn(64, 32, generator=gen) / 32 ** 0.5)
        router.e_score_correction_bias.copy_(0.2 * torch.randn(64, generator=gen))
        x = torch.randn(50, 32, generator=gen)
        _, expected_weights, expected_ids = router(x)
    ids, weights = route_grouped(x, router.weight, router.e_score_correction_bias, 6, groups, top_groups,
                                 norm_topk_prob, 2.5)
    order, expected_order = ids.long().sort(-1), expected_ids.sort(-1)
    assert torch.equal(order.values, expected_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), expected_weights.gather(1, expected_order.indices),
                               atol=0, rtol=0)
