"""Chooses the attention node for a request.

Least-loaded among the ready nodes for now; semantic routing by predicted expert group plugs in here."""
from __future__ import annotations

from .nodes import AttentionNodeClient


def choose_node(nodes: list[AttentionNodeClient]) -> AttentionNodeClient | None:
    """The ready node with the fewest tokens in flight (ties: the one given fewest requests so far);
    None when no node is ready."""
    ready = [n for n in nodes if n.ready]
    return min(ready, key=lambda n: (n.load_tokens, n.requests_routed, n.index)) if ready else None
