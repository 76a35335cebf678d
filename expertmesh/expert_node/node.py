"""The expert node: holds its experts of every layer, computes what attention nodes dispatch to it.

Whatever has arrived is computed together, layer by layer, without waiting on senders that are idle."""
from __future__ import annotations

import asyncio
import logging

import torch

from ..model.layers import experts_partial_sum
from ..model.weights import ExpertWeights, experts_by_layer
from ..transport.base import Listener, PeerId
from ..telemetry import PhaseClock
from ..transport.protocol import (Combine, Dispatch, ExpertError, ExpertStatus, Hello, HelloReply, Message, NodeTrace,
                                  StatusRequest, TraceControl)

log = logging.getLogger(__name__)


class ExpertNode:
    def __init__(self, node_id: int, experts: dict[tuple[int, int], ExpertWeights], num_experts: int,
                 listener: Listener, control: Listener | None = None) -> None:
        self.node_id = node_id
        self.num_experts = num_experts
        self.listener = listener
        self.control = control  # status and traces for the gateway
        self.clock = PhaseClock()
        self.experts_of_layer = experts_by_layer(experts)
        self._inbox: asyncio.Queue[tuple[PeerId, Message]] = asyncio.Queue()
        self.tokens_computed = 0

    async def serve(self) -> None:
        receiver = asyncio.create_task(self._receive())
        control = asyncio.create_task(self._control()) if self.control is not None else None
        try:
            while True:
                batch = [await self._inbox.get()]
                while not self._inbox.empty():  # take everything that has arrived
                    batch.append(self._inbox.get_nowait())
                await self._compute(batch)
                if receiver.done():
                    receiver.result()  # re-raise the receiver's failure
        finally:
            receiver.cancel()
            if control is not None:
                control.cancel()

    async def _control(self) -> None:
        while True:
            peer, message = await self.control.recv()
            if isinstance(message, StatusRequest):
                phases, seconds, wall = self.clock.totals()
                await self.control.send(peer, ExpertStatus(self.node_id, True, self.tokens_computed, phases,
                                                           seconds, wall))
            elif isinstance(message, TraceControl):
                events = self.clock.toggle_trace(message.record)
                await self.control.send(peer, NodeTrace(f"expert node {self.node_id}", events))

    async def _receive(self) -> None:
        while True:
            peer, message = await self.listener.recv()
            if isinstance(message, Hello):
                held = [layer * self.num_experts + e for layer, experts in self.experts_of_layer.items()
                        for e in experts]
                await self.listener.send(peer, HelloReply(self.node_id, held))
            elif isinstance(message, Dispatch):
                self._inbox.put_nowait((peer, message))
            else:
                log.warning("expert node %d: ignoring unexpected %s", self.node_id, type(message).__name__)

    async def _compute(self, batch: list[tuple[PeerId, Dispatch]]) -> None:
        by_layer: dict[int, list[tuple[PeerId, Dispatch]]] = {}
        for peer, dispatch in batch:
            by_layer.setdefault(dispatch.layer, []).append((peer, dispatch))
        for layer, items in by_layer.items():
            try:
                with self.clock.phase("expert_compute"):
                    hidden = torch.cat([d.hidden for _, d in items])
                    ids = torch.cat([d.expert_ids for _, d in items])
                    weights = torch.cat([d.expert_weights for _, d in items])
                    for _, d in items:  # copied out: their receive memory can take the next dispatches
                        self.listener.recycle(d)
                    partial = experts_partial_sum(hidden, ids, weights, self.experts_of_layer.get(layer, {}))
            except Exception as exc:  # answer every sender; the node itself keeps serving
                log.exception("expert node %d: layer %d failed", self.node_id, layer)
                for peer, d in items:
                    await self.listener.send(peer, ExpertError(d.step, d.layer, d.microbatch, repr(exc)))
                continue
            self.tokens_computed += hidden.shape[0]
            start = 0
            with self.clock.phase("combine_send"):
                for peer, d in items:
                    end = start + d.hidden.shape[0]
                    await self.listener.send(peer, Combine(d.step, d.layer, d.microbatch, partial[start:end]))
                    start = end
