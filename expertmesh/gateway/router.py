"""Chooses the attention node for a request: with a domain predictor, a node in the domain whose experts
the prompt will most likely use (Sem-MoE's inter-request rebatching), within a load bound; else the least loaded.

Decisions are counted for /metrics: predicted (went to its predicted domain), overflow (that domain was over
the load bound), least_loaded (no predictor)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .nodes import AttentionNodeClient


@dataclass
class RoutingPolicy:
    predictor: object | None = None  # placement.predictor.DomainPredictor
    attention_domain: list[int] | None = None  # domain of each attention node (from the topology)
    load_bound: float = 1.25  # a node may take a request while its queued tokens <= bound x the mean
    decisions: Counter = field(default_factory=Counter)
    requests_per_domain: Counter = field(default_factory=Counter)


def _least_loaded(nodes: list[AttentionNodeClient]) -> AttentionNodeClient:
    """Fewest tokens in flight; ties to the node given the fewest requests so far, then the lowest index."""
    return min(nodes, key=lambda n: (n.load_tokens, n.requests_routed, n.index))


def choose_node(nodes: list[AttentionNodeClient], prompt_ids: list[int],
                policy: RoutingPolicy | None = None) -> AttentionNodeClient | None:
    """The node for this request, or None when no node is ready."""
    ready = [n for n in nodes if n.ready]
    if not ready:
        return None
    if policy is None or policy.predictor is None or policy.attention_domain is None:
        if policy is not None:
            policy.decisions["least_loaded"] += 1
        return _least_loaded(ready)
    domain, _ = policy.predictor.predict(prompt_ids)
    mean_load = sum(n.load_tokens for n in ready) / len(ready)
    local = [n for n in ready if policy.attention_domain[n.index] == domain]
    if local:
        best = _least_loaded(local)
        if best.load_tokens <= policy.load_bound * mean_load:
            policy.decisions["predicted"] += 1
            policy.requests_per_domain[domain] += 1
            return best
    chosen = _least_loaded(ready)
    policy.decisions["overflow"] += 1
    policy.requests_per_domain[policy.attention_domain[chosen.index]] += 1
    return chosen
