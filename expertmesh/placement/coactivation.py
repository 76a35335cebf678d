"""Which experts fire together in a routing trace: per token within a layer, per token across consecutive
layers, per request across all layers, plus per-expert and per-domain-label loads. Requests are spans of a document."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .routing_stats import selection_counts
from .trace import RoutingTrace


@dataclass
class Coactivation:
    token_pairs: np.ndarray  # [L, E, E] tokens choosing both a and b at layer l (a != b); diagonal = load
    next_layer: np.ndarray  # [L-1, E, E] tokens choosing a at layer l and b at layer l+1
    load: np.ndarray  # [L, E] selections of each expert (one per token and top-k slot)
    domain_load: np.ndarray  # [K, L, E] selections by tokens of each domain label (K = 0 when unlabelled)
    request_pairs: np.ndarray  # [L*E, L*E] sum over requests of usage(a) * usage(b) / request tokens
    moe_layers: list[int]  # model layer id of each of the L rows
    num_tokens: int

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])


def split_requests(trace: RoutingTrace, tokens_per_request: int, min_tokens: int = 1) -> np.ndarray:
    """[R, 2] (start, stop) token spans: each document cut into consecutive pieces of tokens_per_request
    (the last piece shorter), pieces under min_tokens dropped. A request never spans two documents."""
    if tokens_per_request < 1:
        raise ValueError(f"tokens_per_request={tokens_per_request}; must be >= 1")
    change = np.flatnonzero(np.diff(trace.doc_index)) + 1
    doc_starts = np.concatenate([[0], change])
    doc_stops = np.concatenate([change, [trace.num_tokens]])
    spans = [(s, min(s + tokens_per_request, stop)) for start, stop in zip(doc_starts, doc_stops)
             for s in range(int(start), int(stop), tokens_per_request)]
    spans = [(a, b) for a, b in spans if b - a >= min_tokens]
    return np.array(spans, np.int64).reshape(-1, 2)


def request_usage(trace: RoutingTrace, spans: np.ndarray) -> np.ndarray:
    """[R, L, E]: selections of each expert by the tokens of each request."""
    num_layers, experts = trace.expert_ids.shape[1], trace.num_experts
    request_of = np.full(trace.num_tokens, -1, np.int64)
    for r, (start, stop) in enumerate(spans):
        request_of[start:stop] = r
    kept = request_of >= 0
    ids = trace.expert_ids[kept].astype(np.int64)  # [T', L, k]
    flat = (request_of[kept][:, None, None] * num_layers + np.arange(num_layers)[None, :, None]) * experts + ids
    counts = np.bincount(flat.reshape(-1), minlength=len(spans) * num_layers * experts)
    return counts.reshape(len(spans), num_layers, experts)


def coactivation(trace: RoutingTrace, spans: np.ndarray | None = None) -> Coactivation:
    """All statistics of one trace; `spans` (from split_requests) define the requests for request_pairs
    (default: whole documents)."""
    ids = trace.expert_ids.astype(np.int64)  # [T, L, k]
    num_tokens, num_layers, top_k = ids.shape
    experts = trace.num_experts
    pairs = np.zeros((num_layers, experts, experts), np.int64)
    for layer in range(num_layers):
        for i in range(top_k):
            for j in range(top_k):
                # i == j fills the diagonal with the load; duplicates within a top-k never happen
                np.add.at(pairs[layer], (ids[:, layer, i], ids[:, layer, j]), 1)
    following = np.zeros((max(num_layers - 1, 0), experts, experts), np.int64)
    for layer in range(num_layers - 1):
        for i in range(top_k):
            for j in range(top_k):
                np.add.at(following[layer], (ids[:, layer, i], ids[:, layer + 1, j]), 1)
    load = np.stack([np.bincount(ids[:, layer].reshape(-1), minlength=experts) for layer in range(num_layers)])
    domain_load = selection_counts(trace).transpose(1, 0, 2) if trace.domains else \
        np.zeros((0, num_layers, experts), np.int64)
    if spans is None:
        spans = split_requests(trace, max(trace.num_tokens, 1))
    usage = request_usage(trace, spans).reshape(len(spans), -1).astype(np.float64)
    scaled = usage / np.sqrt(np.maximum(spans[:, 1] - spans[:, 0], 1))[:, None]
    return Coactivation(pairs, following, load, domain_load, scaled.T @ scaled,
                       [int(x) for x in trace.moe_layers], num_tokens)
