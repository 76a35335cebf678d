"""M2NClient (m2n/messages.py) when an expert node is lost: what waited on it goes to live replicas, later dispatches
avoid it, experts without a live replica are reported unavailable, and the node's link is re-established."""
from __future__ import annotations

import asyncio

import pytest
import torch

from expertmesh.m2n.messages import ExpertNodeLost, M2NClient
from expertmesh.placement.plan import Placement
from expertmesh.transport.base import Connection, TransportError
from expertmesh.transport.inproc import InprocTransport
from expertmesh.transport.protocol import Combine, Dispatch, Hello, HelloReply

LAYERS, EXPERTS, HIDDEN = [0, 1], 4, 8  # node 0 holds experts 0-1, node 1 experts 2-3 (and replicas, where given)


def expected(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """What the fake expert nodes' answers add up to: sum over chosen experts of weight x (expert + 1), per row."""
    return (weights * (ids + 1)).sum(dim=1, keepdim=True).expand(-1, HIDDEN)


class ExpertNode:
    """Answers Hello with what the placement gives it and each Dispatch with weight x (expert + 1) per chosen expert;
    `hold` keeps dispatches unanswered (a node that dies with work in hand)."""

    def __init__(self, node: int, placement: Placement, listener) -> None:
        self.node, self.placement, self.listener = node, placement, listener
        self.hold = False
        self.dispatches: list[Dispatch] = []
        self.task = asyncio.create_task(self.serve())

    async def serve(self) -> None:
        while True:
            peer, message = await self.listener.recv()
            if isinstance(message, Hello):
                held = [layer * EXPERTS + e for layer, e in self.placement.pairs_on(self.node)]
                await self.listener.send(peer, HelloReply(self.node, held))
            elif isinstance(message, Dispatch):
                self.dispatches.append(message)
                if not self.hold:
                    valid = message.expert_ids >= 0
                    partial = expected(torch.where(valid, message.expert_ids, -1), message.expert_weights * valid)
                    await self.listener.send(peer, Combine(message.step, message.layer, message.microbatch,
                                                           partial.contiguous()))


class Killable(Connection):
    """A connection whose peer can be made to vanish: recv and send then fail, as a real link's do."""

    def __init__(self, inner: Connection) -> None:
        self.inner, self.killed = inner, asyncio.Event()

    async def send(self, message) -> None:
        if self.killed.is_set():
            raise TransportError("peer gone")
        await self.inner.send(message)

    async def recv(self, timeout_s=None):
        receiving = asyncio.ensure_future(self.inner.recv(timeout_s))
        killed = asyncio.ensure_future(self.killed.wait())
        await asyncio.wait([receiving, killed], return_when=asyncio.FIRST_COMPLETED)
        killed.cancel()
        if self.killed.is_set():
            receiving.cancel()
            raise TransportError("peer gone")
        return receiving.result()

    async def close(self) -> None:
        await self.inner.close()


async def cluster(name: str, placement: Placement) -> tuple[M2NClient, list[ExpertNode], list[int], set[int]]:
    """Two fake expert nodes and a client that reconnects to them; connections made to each node, and the nodes
    that refuse connections (down) for now."""
    transport = InprocTransport()
    listeners = [await transport.listen(f"inproc://{name}{n}") for n in range(2)]
    nodes = [ExpertNode(n, placement, listener) for n, listener in enumerate(listeners)]
    connects, down = [0, 0], set()

    async def connect(node: int) -> Connection:
        connects[node] += 1
        if node in down:
            raise TransportError(f"nothing listens for expert node {node}")
        return Killable(await transport.connect(f"inproc://{name}{node}"))

    m2n = M2NClient([await connect(n) for n in range(2)], placement, 0, recv_timeout_s=5.0, connect=connect)
    await m2n.handshake(max(LAYERS) + 1, EXPERTS, 5.0)
    return m2n, nodes, connects, down


async def run_layer(m2n: M2NClient, step: int, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(ids, dtype=torch.int32)
    weights = torch.rand(ids.shape)
    hidden = torch.randn(ids.shape[0], HIDDEN)
    return await m2n.combine(await m2n.dispatch(step, 0, 0, hidden, ids, weights), hidden), expected(ids, weights)


def test_a_lost_node_s_rows_go_to_replicas_and_it_rejoins():
    both = [[e // 2, 1 - e // 2] for e in range(EXPERTS)]  # every expert on both nodes, its own node first
    placement = Placement(2, {layer: both for layer in LAYERS})

    async def run():
        m2n, nodes, connects, down = await cluster("replicas", placement)
        nodes[1].hold = True
        ids = torch.tensor([[0, 2], [1, 3], [2, 3]], dtype=torch.int32)
        weights = torch.rand(ids.shape)
        hidden = torch.randn(3, HIDDEN)
        handle = await m2n.dispatch(1, 0, 0, hidden, ids, weights)
        assert set(handle.rows_of_node) == {0, 1}
        await asyncio.sleep(0)  # node 1 takes the dispatch, then dies with it
        down.add(1)
        m2n.connections[1].killed.set()
        out = await m2n.combine(handle, hidden)
        torch.testing.assert_close(out, expected(ids, weights))  # node 0 computed node 1's part as well
        assert nodes[0].dispatches[-1].expert_ids.tolist() == [[-1, 2], [-1, 3], [2, 3]]
        assert m2n.available.is_set() and not m2n.live[1]
        count = len(nodes[0].dispatches)
        out, want = await run_layer(m2n, 2, [[2, 3], [0, 3]])  # later dispatches go to node 0 alone
        torch.testing.assert_close(out, want)
        assert len(nodes[0].dispatches) == count + 1
        nodes[1].hold = False
        down.discard(1)
        await asyncio.wait_for(m2n._rejoining[1], 5)  # a new connection and Hello, by itself
        assert m2n.live[1] and connects[1] > 2
        load = m2n._load()  # level with node 0 for replica choice, not idle for as long as it was away
        assert load[1] == load[0] and m2n.stats.bytes_sent[1] < m2n.stats.bytes_sent[0]
        out, want = await run_layer(m2n, 3, [[2, 3], [0, 3]])
        torch.testing.assert_close(out, want)
        assert nodes[1].dispatches[-1].step == 3  # the rejoined node takes its own experts' tokens again
        await m2n.close()

    asyncio.run(run())


def test_experts_without_a_live_replica_are_unavailable_until_their_node_rejoins():
    own = [[e // 2] for e in range(EXPERTS)]
    placement = Placement(2, {layer: own for layer in LAYERS})

    async def run():
        m2n, nodes, connects, down = await cluster("alone", placement)
        nodes[1].hold = True
        handle = await m2n.dispatch(1, 0, 0, torch.randn(2, HIDDEN), torch.tensor([[0, 2], [1, 0]], dtype=torch.int32),
                                    torch.rand(2, 2))
        await asyncio.sleep(0)
        down.add(1)  # dies, and stays away until its restart
        m2n.connections[1].killed.set()
        with pytest.raises(ExpertNodeLost, match=r"layer 0: \[2, 3\].*expert nodes \[1\] are lost"):
            await m2n.combine(handle, torch.zeros(2, HIDDEN))
        assert not m2n.available.is_set()
        with pytest.raises(ExpertNodeLost, match="experts with no live expert node"):
            await run_layer(m2n, 2, [[0, 3]])
        out, want = await run_layer(m2n, 3, [[0, 1], [1, 0]])  # tokens of node 0's experts alone still run
        torch.testing.assert_close(out, want)
        nodes[1].hold = False
        down.discard(1)
        await asyncio.wait_for(m2n.available.wait(), 5)
        out, want = await run_layer(m2n, 4, [[0, 3], [2, 3]])
        torch.testing.assert_close(out, want)
        await m2n.close()

    asyncio.run(run())
