"""M2N dispatch and combine over message transports (ucx, zmq, inproc): the host on the data's path.

`dispatch` sends each token once to every expert node that computes one of its chosen experts (the other
chosen experts masked to -1); `combine` waits for each node's weighted partial sums and adds them up.

An expert node lost (its link fails, or it does not answer in time) is routed around: what was waiting on it goes
again to live replicas of its experts, later dispatches choose among live replicas only, and its link is
re-established in the background (new connection, new Hello) until the restarted node answers. Experts with no
live replica make `available` false until then (the attention node holds its steps)."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

import torch

from ..host_copy import to_device
from ..placement.plan import Placement
from ..placement.replication import choose_replica
from ..transport.base import Connection, TransportError
from ..transport.protocol import (Combine, Dispatch, ExpertError, Hello, Message, TensorMeta, packed_offsets,
                                  packed_views)
from .handshake import ExpertNodeError, greet_expert_nodes, hello_reply


log = logging.getLogger(__name__)


class ExpertNodeLost(TransportError):
    """The link to an expert node failed, and some experts it was computing have no live replica."""


@dataclass
class Part:
    """Rows of a dispatch sent to one node, and the future of its answer."""
    node: int
    rows: torch.Tensor
    answer: asyncio.Future


@dataclass
class DispatchHandle:
    """What combine needs: which rows went to which node, the futures of their answers, and what was sent (a lost
    node's rows go again to replicas)."""
    key: tuple[int, int, int]  # (step, layer, microbatch)
    num_tokens: int
    parts: list[Part]
    sent: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden, expert ids, expert weights: all rows
    on_node: torch.Tensor  # [nodes, tokens, k]: which of each token's chosen experts each node computes

    @property
    def rows_of_node(self) -> dict[int, torch.Tensor]:
        return {part.node: part.rows for part in self.parts}


@dataclass
class LinkStats:
    bytes_sent: list[int]
    messages_sent: list[int]
    bytes_received: list[int]


class M2NClient:
    """The attention node's side of the expert links: one Connection per expert node. With `connect` (a new
    connection to expert node n, credentials presented), a lost node's link is re-established by itself."""

    def __init__(self, connections: list[Connection], placement: Placement, attention_node: int,
                 recv_timeout_s: float, device: str = "cpu", attention_domain: int = 0,
                 expert_domain: list[int] | None = None, load_bound: float | None = None,
                 connect: Callable[[int], Awaitable[Connection]] | None = None) -> None:
        self.connections = connections
        self.placement = placement
        self.attention_node = attention_node
        self.recv_timeout_s = recv_timeout_s
        n = len(connections)
        self.device = device
        self.attention_domain = attention_domain
        self.expert_domain = expert_domain or [0] * n
        self.load_bound = load_bound  # spill to a remote replica when every local one is above bound x mean load
        self.connect = connect
        self.live = [True] * n
        self.unavailable: dict[int, list[int]] = {}  # layer -> experts with no live node (routed to -1)
        self.available = asyncio.Event()  # set while every expert has a live node
        # node_of[layer][expert]: the node this attention node sends to; layers with replicas choose per step
        self.node_of: dict[int, torch.Tensor] = {}
        self.replicated_layers = {layer for layer, experts in placement.nodes_of.items()
                                  if any(len(nodes) > 1 for nodes in experts)}
        self._replicas_chosen_at: dict[int, int] = {}  # layer -> the step its replicas were last chosen for
        self._node_ids = torch.arange(n, dtype=torch.int32, device=device).view(-1, 1, 1)  # to compare node_of with
        self.stats = LinkStats([0] * n, [0] * n, [0] * n)
        # added to bytes_sent where replicas are chosen by load: a rejoined node starts level with the others, rather
        # than taking every replicated expert's tokens until it has caught up with what it missed
        self._load_offset = [0.0] * n
        # answers awaited from each node per (step, layer, microbatch), in the order sent (a lost node's rows may
        # go to a replica that already has a dispatch of that key; a node answers a link's dispatches in order)
        self._pending: list[dict[tuple[int, int, int], deque[asyncio.Future]]] = [{} for _ in range(n)]
        # send buffers per (node, microbatch), grown as needed and reused at every layer and step: a buffer is
        # free again once that node has answered the microbatch's previous layer, which combine awaits
        self._send_buffers: dict[tuple[int, int], torch.Tensor] = {}
        self._readers: list[asyncio.Task | None] = [None] * n
        self._rejoining: dict[int, asyncio.Task] = {}
        self._hello: tuple[int, int, float] | None = None  # num_layers, num_experts, timeout_s: to greet again
        self._route()

    async def handshake(self, num_layers: int, num_experts: int, timeout_s: float) -> None:
        """Greets every expert node and checks it holds what the placement says; starts the readers."""
        await greet_expert_nodes(self.connections, self.placement, self.attention_node, num_layers, num_experts,
                                 timeout_s)
        self._hello = (num_layers, num_experts, timeout_s)
        for node in range(len(self.connections)):
            self._watch(node)

    @property
    def rejoins(self) -> bool:
        """Whether a lost expert node's link is re-established (else its experts stay unavailable)."""
        return self.connect is not None

    def _watch(self, node: int) -> None:
        conn = self.connections[node]
        conn.on_peer_lost(lambda: self._lose(node, conn, f"link to expert node {node} failed: the peer is gone"))
        self._readers[node] = asyncio.create_task(self._read(node, conn))

    async def _read(self, node: int, conn: Connection) -> None:
        try:
            while True:
                message = await conn.recv()
                self._resolve(node, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the link is gone
            self._lose(node, conn, f"link to expert node {node} failed: {exc!r}")

    def _resolve(self, node: int, message: Message) -> None:
        if not isinstance(message, (Combine, ExpertError)):
            raise ExpertNodeError(f"expert node {node} sent unexpected {type(message).__name__}")
        key = (message.step, message.layer, message.microbatch)
        waiting = self._pending[node].get(key)
        if not waiting:
            return  # an answer for a step that already failed
        future = waiting.popleft()
        if not waiting:
            del self._pending[node][key]
        if future.done():
            return  # its step failed meanwhile
        if isinstance(message, ExpertError):
            future.set_exception(ExpertNodeError(f"expert node {node}, layer {message.layer}: {message.error}"))
        else:
            self.stats.bytes_received[node] += message.partial.nbytes
            future.set_result(message)

    def _lose(self, node: int, conn: Connection, why: str) -> None:
        """Expert node `node` is gone: fail what waits on it (gather sends it again to replicas), route around it,
        and start re-establishing its link."""
        if not self.live[node] or self.connections[node] is not conn:
            return  # already known, or news about a link replaced since
        self.live[node] = False
        lost = ExpertNodeLost(why)
        for waiting in self._pending[node].values():
            for future in waiting:
                if not future.done():
                    future.set_exception(lost)
        self._pending[node].clear()
        self._route()
        missing = sum(len(experts) for experts in self.unavailable.values())
        log.warning("%s; %s while it rejoins", why, f"{missing} experts have no live replica" if missing
                    else "its experts go to their replicas")
        if self.connect is not None and self._hello is not None:
            self._rejoining[node] = asyncio.create_task(self._rejoin(node))

    async def _rejoin(self, node: int) -> None:
        """Connects to expert node `node` again until its (restarted) process answers the Hello; then serves it."""
        loop = asyncio.get_running_loop()
        lost_at = loop.time()
        reader = self._readers[node]
        if reader is not None:
            reader.cancel()
        await _close_quietly(self.connections[node])
        num_layers, num_experts, timeout_s = self._hello
        while True:
            conn = None
            try:
                conn = await self.connect(node)
                await conn.send(Hello(self.attention_node, num_layers, num_experts))
                await hello_reply(conn, node, self.placement, num_experts, timeout_s)
                break
            except Exception as exc:  # not up yet, or not the node we expect (yet): again, whatever it was
                log.info("expert node %d has not rejoined yet: %r", node, exc)
                if conn is not None:
                    await _close_quietly(conn)
                await asyncio.sleep(0.2)
        self.connections[node] = conn
        self.live[node] = True
        load = self._load()
        others = [load[m] for m in range(len(load)) if m != node and self.live[m]]
        if others:
            self._load_offset[node] += sum(others) / len(others) - load[node]
        self._watch(node)
        self._route()
        del self._rejoining[node]
        log.warning("expert node %d rejoined %.1f s after it was lost", node, loop.time() - lost_at)

    def _route(self) -> None:
        """node_of over the live nodes: each expert's first live holder (replicated layers choose again at their
        next dispatch); -1 and listed in `unavailable` where none is live."""
        self.unavailable = {}
        for layer, experts in self.placement.nodes_of.items():
            chosen = []
            for expert, nodes in enumerate(experts):
                live = [n for n in nodes if self.live[n]]
                chosen.append(live[0] if live else -1)
                if not live:
                    self.unavailable.setdefault(layer, []).append(expert)
            self.node_of[layer] = torch.tensor(chosen, dtype=torch.int32, device=self.device)
        self._replicas_chosen_at.clear()
        if self.unavailable:
            self.available.clear()
        else:
            self.available.set()

    def why_unavailable(self) -> str:
        down = [n for n, live in enumerate(self.live) if not live]
        layers = ", ".join(f"layer {layer}: {experts}" for layer, experts in sorted(self.unavailable.items()))
        return f"experts with no live expert node ({layers}); expert nodes {down} are lost, waiting for them to rejoin"

    async def begin_step(self, step: int, tokens: list[int]) -> None:
        """Messages carry their own shape: nothing to announce."""

    async def end_step(self, step: int, event=None) -> None:
        """Every answer was awaited in gather."""

    async def dispatch(self, step: int, layer: int, microbatch: int, hidden: torch.Tensor,
                       expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> DispatchHandle:
        key = (step, layer, microbatch)
        if layer in self.replicated_layers and self._replicas_chosen_at.get(layer) != step:
            self._choose_replicas(layer)  # once per step and layer: the loads move little within a step
            self._replicas_chosen_at[layer] = step
        node_of_choice = self.node_of[layer][expert_ids.long()]  # [tokens, k]
        if layer in self.unavailable and bool((node_of_choice < 0).any()):  # a host wait, only while nodes are lost
            raise ExpertNodeLost(f"layer {layer}: {self.why_unavailable()}")
        on_node = node_of_choice.unsqueeze(0) == self._node_ids  # [nodes, tokens, k]
        # Message sizes must be known on the host: copying the [nodes, tokens] row mask is the dispatch's one wait
        # on the device (it was one for the list of nodes plus one per node).
        rows_of_node = on_node.any(dim=2).cpu()
        handle = DispatchHandle(key, hidden.shape[0], [], (hidden, expert_ids, expert_weights), on_node)
        for node in range(len(self.connections)):
            rows = torch.nonzero(rows_of_node[node], as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            rows = to_device(rows, hidden.device)
            sources = (hidden, torch.where(on_node[node], expert_ids, -1), expert_weights)
            buffers = self._buffers(node, microbatch, rows.numel(), sources)
            message = Dispatch(step, layer, microbatch,
                               *(torch.index_select(src, 0, rows, out=buf) for src, buf in zip(sources, buffers)))
            handle.parts.append(Part(node, rows, await self._send(node, message)))
        return handle

    async def _send(self, node: int, message: Dispatch) -> asyncio.Future:
        """Sends to `node`; the future of its answer (failed with ExpertNodeLost if the link fails meanwhile)."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # a step that fails elsewhere first never awaits it
        if not self.live[node]:  # lost while this dispatch was being sent to the other nodes
            future.set_exception(ExpertNodeLost(f"expert node {node} was lost"))
            return future
        self._pending[node].setdefault((message.step, message.layer, message.microbatch), deque()).append(future)
        conn = self.connections[node]
        try:
            await conn.send(message)
        except TransportError as exc:
            self._lose(node, conn, f"link to expert node {node} failed: {exc}")
            return future
        self.stats.bytes_sent[node] += sum(t.nbytes for t in message.tensors())
        self.stats.messages_sent[node] += 1
        return future

    def _choose_replicas(self, layer: int) -> None:
        """Locality first, then load: a replica in this attention node's domain, the one sent the fewest bytes;
        a remote one when every local replica is over the load bound. Live replicas only."""
        load = self._load()
        spill_above = self.load_bound * sum(load) / len(load) if self.load_bound and sum(load) > 0 else None
        chosen = []
        for nodes in self.placement.nodes_of[layer]:
            live = [n for n in nodes if self.live[n]]
            chosen.append(choose_replica(live, self.attention_domain, self.expert_domain, load, spill_above)
                          if live else -1)
        self.node_of[layer] = torch.tensor(chosen, dtype=torch.int32, device=self.device)

    def _load(self) -> list[float]:
        return [sent + offset for sent, offset in zip(self.stats.bytes_sent, self._load_offset)]

    def _buffers(self, node: int, microbatch: int, rows: int, like: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Views of `rows` rows shaped like each of `like`, carved one after another (protocol.packed_offsets)
        from this (node, microbatch)'s send buffer, so that a transport can send them as one frame."""
        metas = [TensorMeta(t.dtype, (rows, *t.shape[1:])) for t in like]
        _, nbytes = packed_offsets(metas)
        key = (node, microbatch)
        held = self._send_buffers.get(key)
        if held is None or held.numel() < nbytes or held.device != like[0].device:
            capacity = max(nbytes, 2 * held.numel() if held is not None else 0)
            held = self._send_buffers[key] = torch.empty(capacity, dtype=torch.uint8, device=like[0].device)
        return packed_views(held, metas)

    async def gather(self, handle: DispatchHandle) -> list[Combine | None]:
        """Every part's answer (partial sums for its rows), waiting at most recv_timeout_s for each. A node lost
        meanwhile, or silent that long, is routed around: its rows go again to live replicas, as more parts;
        ExpertNodeLost if some of its experts have none."""
        answers: list[Combine | None] = []
        while len(answers) < len(handle.parts):  # parts may grow
            part = handle.parts[len(answers)]
            try:
                answers.append(await asyncio.wait_for(part.answer, self.recv_timeout_s))
            except ExpertNodeLost as exc:
                why = str(exc)
                answers.append(None)
                await self._send_again(handle, part, why)
            except asyncio.TimeoutError:  # as good as lost: its link is re-established, which proves it alive
                why = (f"expert node {part.node} did not answer layer {handle.key[1]} of step {handle.key[0]} "
                       f"within {self.recv_timeout_s} s")
                self._lose(part.node, self.connections[part.node], why)
                answers.append(None)
                await self._send_again(handle, part, why)
        return answers

    async def _send_again(self, handle: DispatchHandle, lost: Part, why: str) -> None:
        """The experts that a lost part's node was computing for its rows, to their live replicas."""
        step, layer, microbatch = handle.key
        hidden, expert_ids, expert_weights = handle.sent
        ids = torch.where(handle.on_node[lost.node], expert_ids, -1)[lost.rows]  # [rows, k]
        node_of_choice = torch.where(ids >= 0, self.node_of[layer][ids.clamp(min=0).long()], -2)
        if bool((node_of_choice == -1).any()):
            raise ExpertNodeLost(f"{why}; layer {layer}: {self.why_unavailable()}")
        for node in range(len(self.connections)):
            chosen = node_of_choice == node
            subset = torch.nonzero(chosen.any(dim=1), as_tuple=True)[0]
            if subset.numel() == 0:
                continue
            rows = lost.rows[subset]
            # new tensors, not the node's send buffer: that one may still carry this layer's first dispatch
            message = Dispatch(step, layer, microbatch, hidden.index_select(0, rows),
                               torch.where(chosen, ids, -1)[subset], expert_weights.index_select(0, rows))
            handle.parts.append(Part(node, rows, await self._send(node, message)))

    def reduce(self, handle: DispatchHandle, answers: list[Combine | None], like: torch.Tensor) -> torch.Tensor:
        """The sum of the parts' partial sums, one row per dispatched token, shaped like `like`; the answers'
        memory goes back to their links for the next layer's answers."""
        out = torch.zeros_like(like)
        for part, answer in zip(handle.parts, answers):
            if answer is None:
                continue  # lost: its rows were sent again as later parts
            out.index_add_(0, part.rows, answer.partial.to(out.dtype))
            self.connections[part.node].recycle(answer)
        return out

    async def combine(self, handle: DispatchHandle, like: torch.Tensor) -> torch.Tensor:
        return self.reduce(handle, await self.gather(handle), like)

    async def close(self) -> None:
        for task in [*self._readers, *self._rejoining.values()]:
            if task is not None:
                task.cancel()
        for conn in self.connections:
            await _close_quietly(conn)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _close_quietly(conn: Connection) -> None:
    """Closes a link whose peer may be gone: nothing to report then."""
    try:
        await conn.close()
    except Exception as exc:
        log.debug("closing a lost link: %r", exc)
