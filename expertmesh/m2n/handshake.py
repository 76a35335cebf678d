"""The handshake between an attention node and its expert nodes: a Hello each way, at start and when a lost expert
node rejoins. Each expert node must hold what the placement gives it."""
from __future__ import annotations

import logging

from ..placement.plan import Placement
from ..transport.base import Connection, TransportError
from ..transport.protocol import ExpertError, Hello, HelloReply

log = logging.getLogger(__name__)


class ExpertNodeError(RuntimeError):
    """An expert node failed to compute a dispatch, or its placement disagrees with ours."""


def link_facts(links, rank: int, peer: int) -> tuple[str, str, str]:
    """(host, device, backend) of this node's end of its link to `peer`, as the handshake carries them; empty
    without a LinkPlan (links made by hand)."""
    plan = getattr(links, "plan", None)
    if plan is None:
        return "", "", ""
    return plan.hosts[rank], plan.devices[rank], plan.between(rank, peer)


def check_link(links, rank: int, peer: int, peer_name: str, host: str, device: str, link: str) -> None:
    """ValueError unless `peer` chose the backend this node chose for their link (both read it off their configs);
    logs the link."""
    mine, _, chosen = link_facts(links, rank, peer)
    if not chosen or not link:
        return
    if link != chosen:
        raise ValueError(f"the link to {peer_name} (host {host!r}, {device}): it chose {link}, this node {chosen} "
                         f"(host {mine!r}): were they started with different configs (transport.backend, cluster "
                         f"hosts or addresses)?")
    log.info("link to %s (host %s, %s): %s", peer_name, host, device, link)


async def greet_expert_nodes(connections: list[Connection], placement: Placement, attention_node: int,
                             num_layers: int, num_experts: int, timeout_s: float, links=None) -> None:
    """The handshake: every expert node must answer within timeout_s and hold what the placement gives it. With
    the lockstep M2N's links (m2n/links.py), both sides also exchange what reaches their receive slots, and check
    that they chose the same backend for their link."""
    for node, conn in enumerate(connections):
        region = links.region_handle(links.expert_rank(node)) if links is not None else b""
        facts = link_facts(links, attention_node, links.expert_rank(node)) if links is not None else ("", "", "")
        await conn.send(Hello(attention_node, num_layers, num_experts, region, *facts))
    for node, conn in enumerate(connections):
        reply = await hello_reply(conn, node, placement, num_experts, timeout_s)
        if links is not None:
            try:
                check_link(links, attention_node, links.expert_rank(node), f"expert node {node}", reply.host,
                           reply.device, reply.link)
            except ValueError as exc:
                raise ExpertNodeError(str(exc)) from None
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
