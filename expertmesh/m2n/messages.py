"""M2N dispatch and combine over message transports (ucx, zmq, inproc): the host on the data's path.

`dispatch` sends each token once to every expert node that computes one of its chosen experts (the other
chosen experts masked to -1); `combine` waits for each node's weighted partial sums and adds them up."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from ..host_copy import to_device
from ..placement.plan import Placement
from ..placement.replication import choose_replica
from ..transport.base import Connection, TransportError
from ..transport.protocol import (Combine, Dispatch, ExpertError, Hello, HelloReply, Message, TensorMeta, packed_offsets,
                       packed_views)


class ExpertNodeError(RuntimeError):
    """An expert node failed to compute a dispatch, or its placement disagrees with ours."""


@dataclass
class DispatchHandle:
    """What combine needs: which rows went to which node, and the futures of their answers."""
    key: tuple[int, int, int]  # (step, layer, microbatch)
    num_tokens: int
    rows_of_node: dict[int, torch.Tensor]
    answers: dict[int, asyncio.Future]


@dataclass
class LinkStats:
    bytes_sent: list[int]
    messages_sent: list[int]
    bytes_received: list[int]


async def greet_expert_nodes(connections: list[Connection], placement: Placement, attention_node: int,
                             num_layers: int, num_experts: int, timeout_s: float, links=None) -> None:
    """The handshake: every expert node must answer within timeout_s and hold what the placement gives it. With
    the lockstep M2N's links (m2n/links.py), both sides also exchange what reaches their receive slots."""
    for node, conn in enumerate(connections):
        region = links.region_handle(links.expert_rank(node)) if links is not None else b""
        await conn.send(Hello(attention_node, num_layers, num_experts, region))
    for node, conn in enumerate(connections):
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
        if links is not None:
            links.attach(links.expert_rank(node), reply.region)


class M2NClient:
    """The attention node's side of the expert links: one Connection per expert node."""

    def __init__(self, connections: list[Connection], placement: Placement, attention_node: int,
                 recv_timeout_s: float, device: str = "cpu", attention_domain: int = 0,
                 expert_domain: list[int] | None = None, load_bound: float | None = None) -> None:
        self.connections = connections
        self.placement = placement
        self.attention_node = attention_node
        self.recv_timeout_s = recv_timeout_s
        n = len(connections)
        self.device = device
        self.attention_domain = attention_domain
        self.expert_domain = expert_domain or [0] * n
        self.load_bound = load_bound  # spill to a remote replica when every local one is above bound x mean load
        # node_of[layer][expert]: the node this attention node sends to; layers with replicas choose per step
        self.node_of = {layer: torch.tensor([nodes[0] for nodes in experts], dtype=torch.int32, device=device)
                        for layer, experts in placement.nodes_of.items()}
        self.replicated_layers = {layer for layer, experts in placement.nodes_of.items()
                                  if any(len(nodes) > 1 for nodes in experts)}
        self._replicas_chosen_at: dict[int, int] = {}  # layer -> the step its replicas were last chosen for
        self._node_ids = torch.arange(n, dtype=torch.int32, device=device).view(-1, 1, 1)  # to compare node_of with
        self.stats = LinkStats([0] * n, [0] * n, [0] * n)
        self._pending: list[dict[tuple[int, int, int], asyncio.Future]] = [{} for _ in range(n)]
        # send buffers per (node, microbatch), grown as needed and reused at every layer and step: a buffer is
        # free again once that node has answered the microbatch's previous layer, which combine awaits
        self._send_buffers: dict[tuple[int, int], torch.Tensor] = {}
        self._readers: list[asyncio.Task] = []
        self._failure: Exception | None = None
        self.link_failed = asyncio.Event()  # set with _failure: the node need not wait for a step to learn it

    async def handshake(self, num_layers: int, num_experts: int, timeout_s: float) -> None:
        """Greets every expert node and checks it holds what the placement says; starts the readers."""
        await greet_expert_nodes(self.connections, self.placement, self.attention_node, num_layers, num_experts,
                                 timeout_s)
        self._readers = [asyncio.create_task(self._read(node)) for node in range(len(self.connections))]

    async def _read(self, node: int) -> None:
        conn = self.connections[node]
        try:
            while True:
                message = await conn.recv()
                self._resolve(node, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the link is gone: fail everything waiting on it, and all later dispatches
            self._failure = TransportError(f"link to expert node {node} failed: {exc!r}")
            self.link_failed.set()
            for future in self._pending[node].values():
                if not future.done():
                    future.set_exception(self._failure)

    def _resolve(self, node: int, message: Message) -> None:
        if not isinstance(message, (Combine, ExpertError)):
            raise ExpertNodeError(f"expert node {node} sent unexpected {type(message).__name__}")
        key = (message.step, message.layer, message.microbatch)
        future = self._pending[node].pop(key, None)
        if future is None or future.done():
            return  # an answer for a step that already failed
        if isinstance(message, ExpertError):
            future.set_exception(ExpertNodeError(f"expert node {node}, layer {message.layer}: {message.error}"))
        else:
            self.stats.bytes_received[node] += message.partial.nbytes
            future.set_result(message)

    async def begin_step(self, step: int, tokens: list[int]) -> None:
        """Messages carry their own shape: nothing to announce."""

    async def end_step(self, step: int) -> None:
        """Every answer was awaited in gather."""

    async def dispatch(self, step: int, layer: int, microbatch: int, hidden: torch.Tensor,
                       expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> DispatchHandle:
        if self._failure is not None:
            raise self._failure
        key = (step, layer, microbatch)
        if layer in self.replicated_layers and self._replicas_chosen_at.get(layer) != step:
            self._choose_replicas(layer)  # once per step and layer: the loads move little within a step
            self._replicas_chosen_at[layer] = step
        node_of_choice = self.node_of[layer][expert_ids.long()]  # [tokens, k]
        on_node = node_of_choice.unsqueeze(0) == self._node_ids  # [nodes, tokens, k]
        # Message sizes must be known on the host: copying the [nodes, tokens] row mask is the dispatch's one wait
        # on the device (it was one for the list of nodes plus one per node).
        rows_of_node = on_node.any(dim=2).cpu()
        loop = asyncio.get_running_loop()
        handle = DispatchHandle(key, hidden.shape[0], {}, {})
        for node in range(len(self.connections)):
            rows = torch.nonzero(rows_of_node[node], as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            rows = to_device(rows, hidden.device)
            sources = (hidden, torch.where(on_node[node], expert_ids, -1), expert_weights)
            buffers = self._buffers(node, microbatch, rows.numel(), sources)
            message = Dispatch(step, layer, microbatch,
                               *(torch.index_select(src, 0, rows, out=buf) for src, buf in zip(sources, buffers)))
            future = loop.create_future()
            self._pending[node][key] = future
            await self.connections[node].send(message)
            self.stats.bytes_sent[node] += sum(t.nbytes for t in message.tensors())
            self.stats.messages_sent[node] += 1
            handle.rows_of_node[node] = rows
            handle.answers[node] = future
        return handle

    def _choose_replicas(self, layer: int) -> None:
        """Locality first, then load: a replica in this attention node's domain, the one sent the fewest bytes;
        a remote one when every local replica is over the load bound."""
        load = self.stats.bytes_sent
        spill_above = self.load_bound * sum(load) / len(load) if self.load_bound and sum(load) > 0 else None
        chosen = [choose_replica(nodes, self.attention_domain, self.expert_domain, load, spill_above)
                  for nodes in self.placement.nodes_of[layer]]
        self.node_of[layer] = torch.tensor(chosen, dtype=torch.int32, device=self.device)

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

    async def gather(self, handle: DispatchHandle) -> dict[int, Combine]:
        """Every node's answer (partial sums for the handle's tokens), waiting at most recv_timeout_s."""
        partials = {}
        for node, future in handle.answers.items():
            try:
                partials[node] = await asyncio.wait_for(future, self.recv_timeout_s)
            except asyncio.TimeoutError:
                self._pending[node].pop(handle.key, None)
                raise TransportError(f"expert node {node} did not answer layer {handle.key[1]} of step "
                                     f"{handle.key[0]} within {self.recv_timeout_s} s") from None
        return partials

    def reduce(self, handle: DispatchHandle, answers: dict[int, Combine], like: torch.Tensor) -> torch.Tensor:
        """The sum of the nodes' partial sums, one row per dispatched token, shaped like `like`; the answers'
        memory goes back to their links for the next layer's answers."""
        out = torch.zeros_like(like)
        for node, answer in answers.items():
            out.index_add_(0, handle.rows_of_node[node], answer.partial.to(out.dtype))
            self.connections[node].recycle(answer)
        return out

    async def combine(self, handle: DispatchHandle, like: torch.Tensor) -> torch.Tensor:
        return self.reduce(handle, await self.gather(handle), like)

    async def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        for conn in self.connections:
            await conn.close()
