"""The handshake between an attention node and its expert nodes: a Hello each way, at start and when a lost expert
node rejoins. Each expert node must hold what the placement gives it."""
from __future__ import annotations

from ..placement.plan import Placement
from ..transport.base import Connection, TransportError
from ..transport.protocol import ExpertError, Hello, HelloReply


class ExpertNodeError(RuntimeError):
    """An expert node failed to compute a dispatch, or its placement disagrees with ours."""


async def greet_expert_nodes(connections: list[Connection], placement: Placement, attention_node: int,
                             num_layers: int, num_experts: int, timeout_s: float, links=None) -> None:
    """The handshake: every expert node must answer within timeout_s and hold what the placement gives it. With
    the lockstep M2N's links (m2n/links.py), both sides also exchange what reaches their receive slots."""
    for node, conn in enumerate(connections):
        region = links.region_handle(links.expert_rank(node)) if links is not None else b""
        await conn.send(Hello(attention_node, num_layers, num_experts, region))
    for node, conn in enumerate(connections):
        reply = await hello_reply(conn, node, placement, num_experts, timeout_s)
        if links is not None:
            links.attach(links.expert_rank(node), reply.region)


async def hello_reply(conn: Connection, node: int, placement: Placement, num_experts: int,
                      timeout_s: float) -> HelloReply:
    """Expert node `node`'s answer to our Hello, checked against the placement."""
    try:
        reply = await conn.recv(timeout_s)
    except TransportError as exc:
        raise TransportError(f"expert node {node} did not answer the handshake: {exc}") from None
    if isinstance(reply, ExpertError):
        raise ExpertNodeError(f"expert node {node} refused the handshake: {reply.error}")
    if not isinstance(reply, HelloReply) or reply.expert_node != node:
        raise ExpertNodeError(f"expert node {node}: unexpected handshake answer {reply!r}")
    expected = sorted(layer * num_experts + e for layer, e in placement.pairs_on(node))
    if sorted(reply.held) != expected:
        raise ExpertNodeError(f"expert node {node} holds {len(reply.held)} experts, the placement "
                              f"gives it {len(expected)}: was it started with another placement?")
    return reply
