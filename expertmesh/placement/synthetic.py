"""Synthetic routing traces in a model's routing shape, for simulating models whose checkpoints are out of reach
(DeepSeek-V3: 256 experts, the top 8 within the best 4 of 8 groups) on clusters of any size.

Every document belongs to a text domain and every domain favours some experts of every layer (a random affinity of
spread `skew`), as profiled traces show, so that co-activation placement and rebatching have structure to find.
Each token's scores are its domain's affinity plus Gumbel noise; the model's rule picks from them: top-k, or
DeepSeek's group-limited top-k (groups ranked by their two best scores)."""
from __future__ import annotations

import numpy as np

from ..model.spec import ModelSpec
from .trace import RoutingTrace


def group_limited_top_k(scores: np.ndarray, top_k: int, num_groups: int, top_groups: int) -> np.ndarray:
    """[T, k] the k best experts of each row of scores [T, E] among the top_groups best of num_groups contiguous
    groups, a group ranked by the sum of its two best scores (transformers' DeepseekV3TopkRouter); best first."""
    tokens, experts = scores.shape
    if num_groups > 1:
        grouped = scores.reshape(tokens, num_groups, experts // num_groups)
        group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        dropped = np.argsort(-group_scores, axis=-1)[:, top_groups:]
        grouped = grouped.copy()
        np.put_along_axis(grouped, dropped[..., None], -np.inf, axis=1)
        scores = grouped.reshape(tokens, experts)
    best = np.argpartition(-scores, top_k - 1, axis=-1)[:, :top_k]
    order = np.argsort(-np.take_along_axis(scores, best, -1), axis=-1)
    return np.take_along_axis(best, order, -1)


def synthetic_trace(spec: ModelSpec, name: str, num_docs: int = 64, tokens_per_doc: int = 256, num_domains: int = 4,
                    skew: float = 1.0, seed: int = 0) -> RoutingTrace:
    """A trace of num_docs documents of tokens_per_doc tokens, document d in text domain d % num_domains."""
    if num_docs < 1 or tokens_per_doc < 1 or num_domains < 1:
        raise ValueError(f"need documents, tokens and domains: got {num_docs}, {tokens_per_doc}, {num_domains}")
    rng = np.random.default_rng(seed)
    layers, experts = spec.moe_layer_ids, spec.num_experts
    doc_index = np.repeat(np.arange(num_docs, dtype=np.int32), tokens_per_doc)
    domain_index = (doc_index % num_domains).astype(np.int16)
    expert_ids = np.empty((len(doc_index), len(layers), spec.top_k), np.int16)
    weights = np.empty(expert_ids.shape, np.float16)
    for index in range(len(layers)):
        affinity = rng.normal(0.0, skew, (num_domains, experts))
        scores = affinity[domain_index] + rng.gumbel(size=(len(doc_index), experts))
        chosen = group_limited_top_k(scores, spec.top_k, spec.num_expert_groups, spec.top_groups)
        expert_ids[:, index] = chosen
        picked = np.exp(np.take_along_axis(scores, chosen, -1))
        weights[:, index] = picked / picked.sum(-1, keepdims=True)
    return RoutingTrace(np.zeros(len(doc_index), np.int32), doc_index, domain_index, expert_ids, weights,
                        np.array(layers, np.int32), [f"doc{d}" for d in range(num_docs)],
                        [f"domain{k}" for k in range(num_domains)], experts, f"synthetic:{name}")
