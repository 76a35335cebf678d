"""The router: each token's top-k experts and their weights (softmax over all experts, optionally renormalised over
the chosen k), as today's separate torch ops (the CPU path and oracle) beside the same maths in fewer kernels; and
DeepSeek-V3's group-limited sigmoid router."""
import torch

ROUTE_BACKENDS = ("auto", "reference", "fused")


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, norm_topk_prob: bool, *,
          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of each token of x [tokens, hidden] under router [experts, hidden]: (expert ids [tokens, k]
    int32, weights [tokens, k] float32), most probable first. "auto": the fused ops on CUDA, the reference elsewhere
    (the ops the exactness tests against transformers hold to)."""
    if backend not in ROUTE_BACKENDS:
        raise ValueError(f"backend of route must be one of {ROUTE_BACKENDS}, not {backend!r}")
    if backend == "reference" or (backend == "auto" and x.device.type != "cuda"):
        return route_reference(x, router, top_k, norm_topk_prob)
    return route_fused(x, router, top_k, norm_topk_prob)


def route_reference(x: torch.Tensor, router: torch.Tensor, top_k: int,
                    norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax((x @ router.T).float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids.to(torch.int32), weights


def route_fused(x: torch.Tensor, router: torch.Tensor, top_k: int,
                norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax is monotonic, so the top k of the logits are the top k of the probabilities; renormalised over the k,
    p_i / sum_k p_j = exp(l_i - m) / sum_k exp(l_j - m), the softmax of the k logits alone. softmax(dtype=float32)
    reads the low-precision logits and computes in float32 in one kernel, as .float() then softmax does in two.
    On CUDA: matmul, topk (a select, and a sort of the k), softmax, int32 cast; the reference adds a float cast, and
    a sum and a division when renormalising. Equal logits give equal probabilities, so both pick the same experts up to the order of ties."""
    logits = x @ router.T
    if norm_topk_prob:
        top_logits, ids = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
    else:
        weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), top_k, dim=-1)
    return ids.to(torch.int32), weights


def route_grouped(x: torch.Tensor, router: torch.Tensor, correction_bias: torch.Tensor, top_k: int, num_groups: int,
                  top_groups: int, norm_topk_prob: bool, scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router (transformers' DeepseekV3TopkRouter, op for op, in float32): sigmoid scores; the
    correction bias joins them only to choose; the experts split into num_groups groups ranked by their two best
    biased scores, and the top k are chosen within the top_groups best groups; the weights are the unbiased scores
    of the chosen, renormalised if norm_topk_prob, times scaling_factor. No host sync: CUDA graphs capture it."""
    num_experts = router.shape[0]
    scores = (x.float() @ router.float().T).sigmoid()
    biased = scores + correction_bias
    group_scores = biased.view(-1, num_groups, num_experts // num_groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_ids = torch.topk(group_scores, k=top_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, num_groups, num_experts // num_groups).reshape(-1, num_experts)
    ids = torch.topk(biased.masked_fill(~expert_mask.bool(), float("-inf")), k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids.to(torch.int32), weights * scaling_factor
