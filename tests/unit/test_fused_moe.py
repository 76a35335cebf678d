"""The fused MoE op on CPU: the reference against a loop written here, pair by pair; the grouped_mm backend
against the reference; the expert-sorted block layout the Triton kernels read; stacking and the tile chooser."""
import pytest
import torch
import torch.nn.functional as F

from expertmesh.ops.fused_moe import StackedExperts, _local_rows, fused_moe, fused_moe_reference
from expertmesh.ops.fused_moe_triton import choose_config, expert_blocks_reference
from tests.fused_moe_cases import random_experts, random_routing, rel_err


def loop_per_pair(x, ids, weights, raw):
    """The definition, one (token, slot) pair at a time, in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e in raw:
                gate, up, down = (w.float() for w in raw[e])
                h = x[t].float()
                out[t] += weights[t, j] * ((F.silu(h @ gate.T) * (h @ up.T)) @ down.T)
    return out


# (tokens, num_experts, held, top_k, hidden, inter, skip_every)
CASES = [
    (5, 8, range(8), 2, 64, 96, 0),  # everything held
    (13, 8, [0, 2, 3, 6], 2, 64, 96, 3),  # half held, some pairs skipped
    (3, 16, [1, 4, 9, 15], 1, 32, 48, 0),  # top-1, most experts idle
    (9, 8, [5], 8, 64, 32, 5),  # top-8 over all experts, one held
    (7, 8, [0, 1, 2, 7], 8, 33, 45, 0),  # sizes that are not multiples of 16 bytes in any dtype
    (0, 4, range(4), 2, 64, 96, 0),  # no tokens
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[3]}-H{c[4]}-I{c[5]}")
def test_reference_is_the_per_pair_definition(case):
    tokens, num_experts, held, top_k, hidden, inter, skip = case
    raw, stacked = random_experts(num_experts, list(held), hidden, inter, torch.float32)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2))
    ids, weights = random_routing(tokens, num_experts, top_k, skip)
    expected = loop_per_pair(x, ids, weights, raw)
    got = fused_moe_reference(x, ids, weights, stacked)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[3]}-H{c[4]}-I{c[5]}")
def test_grouped_mm_matches_reference(case, dtype, tolerance):
    tokens, num_experts, held, top_k, hidden, inter, skip = case
    _, stacked = random_experts(num_experts, list(held), hidden, inter, dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2)).to(dtype)
    ids, weights = random_routing(tokens, num_experts, top_k, skip)
    expected = fused_moe_reference(x, ids, weights, stacked)
    got = fused_moe(x, ids, weights, stacked, backend="grouped_mm")
    assert got.dtype == dtype and got.shape == x.shape
    if tokens:
        assert rel_err(got, expected) <= tolerance
    # tokens whose every pair is skipped or held elsewhere get exactly 0, whatever grouped_mm left in its rows
    idle = ~(_local_rows(ids, stacked.local_index) >= 0).any(dim=1)
    assert torch.equal(got[idle], torch.zeros_like(got[idle]))


def test_auto_on_cpu_is_the_reference_bit_for_bit():
    _, stacked = random_experts(8, [0, 3, 4], 64, 96, torch.float32)
    x = torch.randn(11, 64)
    ids, weights = random_routing(11, 8, 2, skip_every=4)
    assert torch.equal(fused_moe(x, ids, weights, stacked), fused_moe_reference(x, ids, weights, stacked))


def test_nothing_held_or_out_of_range_ids_give_zeros():
    _, stacked = random_experts(8, [2], 32, 48, torch.float32)
    x = torch.randn(4, 32)
    ids = torch.tensor([[0, 1], [-1, 3], [8, 200], [-5, 7]], dtype=torch.int32)  # none is expert 2
    for backend in ("reference", "grouped_mm"):
        assert torch.equal(fused_moe(x, ids, torch.rand(4, 2), stacked, backend), torch.zeros_like(x))


def test_stacks_hold_each_expert_at_its_local_row_with_aligned_rows():
    raw, stacked = random_experts(10, [7, 2, 5], 33, 45, torch.bfloat16)
    assert stacked.expert_ids == [2, 5, 7] and (stacked.hidden, stacked.inter) == (33, 45)
    assert stacked.local_index.tolist() == [-1, -1, 0, -1, -1, 1, -1, 2, -1, -1]
    assert stacked.gate_up.shape == (3, 90, 33) and stacked.down.shape == (3, 33, 45)
    for row, e in enumerate(stacked.expert_ids):
        gate, up, down = raw[e]
        assert torch.equal(stacked.gate_up[row], torch.cat([gate, up])) and torch.equal(stacked.down[row], down)
    # rows padded to 16 bytes (torch._grouped_mm's rule), last dimension contiguous
    assert stacked.gate_up.stride(2) == 1 and stacked.gate_up.stride(1) * 2 % 16 == 0
    assert stacked.down.stride(2) == 1 and stacked.down.stride(1) * 2 % 16 == 0
    with pytest.raises(ValueError, match="distinct"):
        StackedExperts.empty([1, 1], 4, 8, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        StackedExperts.empty([4], 4, 8, 8, torch.float32, "cpu")


def test_unknown_backend_and_unaligned_stacks_are_named():
    _, stacked = random_experts(4, [0, 1], 32, 48, torch.float32)
    x, (ids, weights) = torch.randn(3, 32), random_routing(3, 4, 2)
    with pytest.raises(ValueError, match="'cuda_magic'"):
        fused_moe(x, ids, weights, stacked, backend="cuda_magic")
    unaligned = StackedExperts(torch.randn(2, 2 * 45, 33), torch.randn(2, 33, 45), stacked.local_index, [0, 1])
    with pytest.raises(ValueError, match="16-byte"):
        fused_moe(torch.randn(3, 33), ids, weights, unaligned, backend="grouped_mm")


@pytest.mark.parametrize("tokens, num_experts, held, top_k, block_m", [
    (33, 4, range(4), 2, 16), (5, 8, [1, 2, 6], 2, 16), (9, 128, range(0, 128, 2), 8, 32), (1, 8, [3], 2, 64)])
def test_expert_blocks_cover_every_held_pair_once(tokens, num_experts, held, top_k, block_m):
    """The layout the Triton kernels read: each held pair once, in a block of its own expert, in increasing pair
    order; padding and everything past the last expert marked with the pair count; blocks past the last expert
    marked -1; the buffers no bigger than the host bound."""
    _, stacked = random_experts(num_experts, list(held), 16, 16, torch.float32)
    ids, _ = random_routing(tokens, num_experts, top_k, skip_every=7)
    num_pairs, num_local = ids.numel(), len(stacked.expert_ids)
    sorted_pairs, block_expert = expert_blocks_reference(ids, stacked.local_index, num_local, block_m)
    assert sorted_pairs.dtype == block_expert.dtype == torch.int32
    assert sorted_pairs.numel() == block_expert.numel() * block_m
    assert block_expert.numel() == -(-(num_pairs + min(num_pairs, num_local) * (block_m - 1)) // block_m)
    flat_rows = _local_rows(ids, stacked.local_index).reshape(-1)
    seen = []
    for block, expert in enumerate(block_expert.tolist()):
        pairs = sorted_pairs[block * block_m:(block + 1) * block_m].tolist()
        if expert < 0:
            assert all(p == num_pairs for p in pairs)
            continue
        real = [p for p in pairs if p != num_pairs]
        assert real and all(flat_rows[p] == expert for p in real)
        assert pairs[:len(real)] == real  # padding only at the end of an expert's last block
        seen += real
    held_pairs = [p for p in range(num_pairs) if flat_rows[p] >= 0]
    assert seen == sorted(held_pairs, key=lambda p: (int(flat_rows[p]), p))
    busy = block_expert[block_expert >= 0]
    assert torch.equal(busy, busy.sort().values)  # experts in stack order: the busy blocks come first
    assert (block_expert[len(busy):] < 0).all()


@pytest.mark.parametrize("num_experts, top_k, hidden, inter", [(8, 2, 4096, 14336), (128, 8, 2048, 768)])
@pytest.mark.parametrize("tokens", [1, 16, 64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_config_chooser_fits_sm90(tokens, num_experts, top_k, hidden, inter, dtype):
    config = choose_config(tokens, top_k, num_experts, hidden, inter, dtype)
    per_expert = tokens * top_k / num_experts
    assert config.block_m in (16, 32, 64, 128) and (config.block_m >= per_expert or config.block_m == 128)
    element = torch.empty((), dtype=dtype).element_size()
    for tile, weight_tiles in ((config.gate_up, 2), (config.down, 1)):
        assert tile.block_n in (32, 64, 128, 256) and tile.block_k in (32, 64, 128) and tile.num_warps in (4, 8)
        assert tile.num_stages >= 2
        shared_bytes = tile.num_stages * (config.block_m + weight_tiles * tile.block_n) * tile.block_k * element
        assert shared_bytes <= 227 * 1024
        # fp32 accumulators: at most 128 registers a thread
        assert config.block_m * weight_tiles * tile.block_n <= 128 * 32 * tile.num_warps
        # each N tile reads its block's activations again: never more of them than of weights
        assert config.block_m <= weight_tiles * tile.block_n


def test_config_for_mixtral_at_256_tokens_reads_few_activations():
    """64 rows per expert: one block of 128 per expert (no second pass over an expert's weights), and tiles wide
    enough that re-reading the block's rows for every N tile costs at most half the weight traffic."""
    config = choose_config(256, 2, 8, 4096, 14336)
    assert config.block_m == 128
    assert config.gate_up.block_n >= 128 and config.down.block_n >= 128
