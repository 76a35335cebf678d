"""Random experts and routings for the fused MoE op's tests (unit, interpreter and GPU alike)."""
import torch

from expertmesh.ops.fused_moe import stack_experts


def random_experts(num_experts, held, hidden, inter, dtype, device="cpu", seed=0):
    """({expert: (gate, up, down)}, their stacks) for the experts in `held`, scaled to keep outputs O(1)."""
    g = torch.Generator().manual_seed(seed)
    raw = {e: (torch.randn(inter, hidden, generator=g) / hidden ** 0.5,
               torch.randn(inter, hidden, generator=g) / hidden ** 0.5,
               torch.randn(hidden, inter, generator=g) / inter ** 0.5) for e in held}
    raw = {e: tuple(t.to(dtype=dtype, device=device) for t in weights) for e, weights in raw.items()}
    return raw, stack_experts(raw, num_experts)


def random_routing(tokens, num_experts, top_k, skip_every=0, device="cpu", seed=1):
    """(ids [tokens, top_k] int32, distinct per token, every skip_every-th pair -1; weights [tokens, top_k])."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)]) if tokens \
        else torch.zeros(0, top_k, dtype=torch.long)
    ids = ids.to(torch.int32)
    if skip_every:
        ids.view(-1)[::skip_every] = -1  # pairs another node computes
    return ids.to(device), torch.rand(tokens, top_k, generator=g).to(device)


def rel_err(got, expected):
    """Largest absolute difference over the largest magnitude expected."""
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1e-30)).item()
