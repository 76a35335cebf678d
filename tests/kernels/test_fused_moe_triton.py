"""The Triton fused-MoE kernels in Triton's interpreter (CPU tensors) against the torch reference, at small
shapes: one block or several per expert, one K step or several, sizes that need masks, skipped pairs."""
import pytest
import torch

pytest.importorskip("triton")

from expertmesh.ops.fused_moe import (MatmulTile, TritonMoeConfig, fused_moe, fused_moe_reference,  # noqa: E402
                                      stack_experts)
from tests.fused_moe_cases import random_experts, random_routing, rel_err  # noqa: E402

# The interpreter rounds fp32 -> bf16 towards zero (a GPU rounds to nearest), and the kernels keep gate, up and
# the routing product in float32 where the reference rounds each: bf16 is checked against float32 truth.
BF16_TOLERANCE = 3e-2


def check(tokens, num_experts, held, top_k, hidden, inter, dtype, skip_every=0, config=None):
    raw, stacked = random_experts(num_experts, list(held), hidden, inter, dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2)).to(dtype)
    ids, weights = random_routing(tokens, num_experts, top_k, skip_every)
    got = fused_moe(x, ids, weights, stacked, backend="triton", config=config)
    assert got.dtype == dtype and got.shape == x.shape
    if tokens == 0:
        return
    if dtype == torch.float32:
        assert rel_err(got, fused_moe_reference(x, ids, weights, stacked)) <= 1e-5
    else:
        exact = stack_experts({e: tuple(w.float() for w in ws) for e, ws in raw.items()}, num_experts)
        truth = fused_moe_reference(x.float(), ids, weights, exact)  # the same bf16 values, float32 arithmetic
        assert rel_err(got, truth) <= BF16_TOLERANCE
        assert rel_err(fused_moe_reference(x, ids, weights, stacked), truth) <= BF16_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("tokens", [0, 1, 5, 33])
def test_triton_matches_reference(tokens, num_experts, top_k, dtype):
    check(tokens, num_experts, range(num_experts), top_k, 64, 96, dtype)


# block_m 16 with 33 tokens over 4 experts: experts overflow into a second block; K in 2 and 3 even steps
SMALL_TILES = TritonMoeConfig(16, gate_up=MatmulTile(32, 32), down=MatmulTile(32, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_several_blocks_per_expert_and_k_steps(dtype):
    check(33, 4, range(4), 2, 64, 96, dtype, config=SMALL_TILES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_partial_holding_skipped_pairs_and_top8(dtype):
    check(9, 8, [0, 2, 3, 6], 8, 64, 96, dtype, skip_every=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sizes_that_need_masks(dtype):
    """hidden 33 and inter 45: partial K steps and partial N tiles in both launches."""
    check(7, 8, [1, 4, 5], 2, 33, 45, dtype, skip_every=4, config=SMALL_TILES)
    check(7, 8, [1, 4, 5], 2, 33, 45, dtype)
