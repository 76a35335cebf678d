"""Chooses the attention node for a request: with a domain predictor, a node in the domain whose experts
the prompt will most likely use (Sem-MoE's inter-request rebatching), within a load bound; else the least loaded.

Decisions are counted for /metrics: predicted (went to its predicted domain), next_domain (that one was over a
bound, the next most likely took it), overflow (all were: least loaded), least_loaded (no predictor)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .nodes import AttentionNodeClient


@dataclass
class RoutingPolicy:
    predictor: object | None = None  # placement.predictor.DomainPredictor
    attention_domain: list[int] | None = None  # domain of each attention node (from the topology)
    load_bound: float = 1.25  # a node may take a request while its queued tokens <= bound x the mean
    # a domain may take a request while its queued tokens <= (1 + slack) x its expert nodes' share of all queued
    # tokens: replicas are chosen in the sender's domain first, so domain volumes set expert-node loads
    domain_share: list[float] | None = None
    domain_slack: float = 0.0
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
    _, scores = policy.predictor.predict(prompt_ids)
    total = sum(n.load_tokens for n in ready)
    mean_load = total / len(ready)
    volume: dict[int, int] = {}
    for n in ready:
        volume[policy.attention_domain[n.index]] = volume.get(policy.attention_domain[n.index], 0) + n.load_tokens
    for rank, domain in enumerate(sorted(range(len(scores)), key=lambda d: -scores[d])):
        local = [n for n in ready if policy.attention_domain[n.index] == domain]
        if not local:
            continue
        if policy.domain_share is not None and total > 0 and \
                volume.get(domain, 0) > (1 + policy.domain_slack) * policy.domain_share[domain] * total:
            continue
        best = _least_loaded(local)
        if best.load_tokens <= policy.load_bound * mean_load:
            policy.decisions["predicted" if rank == 0 else "next_domain"] += 1
            policy.requests_per_domain[domain] += 1
            return best
    chosen = _least_loaded(ready)
    policy.decisions["overflow"] += 1
    policy.requests_per_domain[policy.attention_domain[chosen.index]] += 1
    return chosen
