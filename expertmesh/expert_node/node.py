"""The expert node: holds its experts of every layer, computes what attention nodes dispatch to it.

Over message transports (ucx, zmq) whatever has arrived is computed together, layer by layer, without waiting on
senders that are idle. Over the lockstep M2N (nccl, gloo: `rounds`), the listener carries only the handshake
and the attention nodes' step plans, and lockstep.py runs the rounds."""
from __future__ import annotations

import asyncio
import logging
import os

import torch

from ..ops.fused_moe import StackedExperts, fused_moe
from ..cuda_graph import warm_up_sizes
from .cuda_graphs import ExpertGraphs
from .lockstep import LockstepRounds
from ..m2n.handshake import check_link, link_facts
from ..transport.base import Listener, PeerId
from ..transport.peers import PeerGate
from ..telemetry import GpuMeter, PhaseClock
from ..transport.protocol import (Combine, Dispatch, ExpertError, ExpertStatus, Hello, HelloReply, Message, NodeTrace,
                                  StatusRequest, StepPlan, TraceControl)

log = logging.getLogger(__name__)


class ExpertNode:
    def __init__(self, node_id: int, experts: dict[int, StackedExperts], num_experts: int,
                 listener: Listener | None, control: Listener | None = None, moe_backend: str = "auto",
                 rounds: LockstepRounds | None = None, secret: str | None = None) -> None:
        self.node_id = node_id
        self.num_experts = num_experts
        self.listener = listener  # may be set later, before serve (__main__ listens once its graphs are captured)
        self.control = control  # status and traces for the gateway
        self.clock = PhaseClock()
        self.experts_of_layer = experts  # {layer: that layer's experts held here, stacked}
        self.moe_backend = moe_backend  # fused_moe's backend: "auto" picks by device and dtype
        self.graphs: list[ExpertGraphs] = []  # one set per lane (lockstep: per attention node), or none
        self.rounds = rounds
        self._peer_of: dict[int, PeerId] = {}  # attention node -> its peer id on the listener
        self.data_gate = PeerGate(secret, f"expert node {node_id} (data)")
        self.control_gate = PeerGate(secret, f"expert node {node_id} (control)")
        self._inbox: asyncio.Queue[tuple[PeerId, Message]] = asyncio.Queue()
        self.tokens_computed = 0
        self.gpu = GpuMeter(next((s.gate_up.device for s in experts.values() if s.gate_up.is_cuda), None))

    async def serve(self) -> None:
        receiver = asyncio.create_task(self._receive())
        control = asyncio.create_task(self._control()) if self.control is not None else None
        try:
            if self.rounds is not None:
                lanes = asyncio.ensure_future(self.rounds.serve(self._round_failed))
                try:
                    await asyncio.wait({lanes, receiver}, return_when=asyncio.FIRST_COMPLETED)
                    (lanes if lanes.done() else receiver).result()  # whichever ended, ended by failing
                finally:
                    lanes.cancel()
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
            if not self.control_gate.admits(peer, message):
                continue
            if isinstance(message, StatusRequest):
                phases, seconds, wall = self.clock.totals()
                computed = self.tokens_computed + (self.rounds.tokens_computed if self.rounds is not None else 0)
                await self.control.send(peer, ExpertStatus(self.node_id, True, computed, phases, seconds, wall,
                                                           os.getpid(), *self.gpu.totals()))
            elif isinstance(message, TraceControl):
                events = self.clock.toggle_trace(message.record)
                gpu = [] if message.record else self.gpu.timeline()
                await self.control.send(peer, NodeTrace(f"expert node {self.node_id}", events, gpu))

    async def _receive(self) -> None:
        while True:
            peer, message = await self.listener.recv()
            if not self.data_gate.admits(peer, message):
                continue
            if isinstance(message, Hello):
                self._peer_of[message.attention_node] = peer
                held = [layer * self.num_experts + e for layer, stacked in self.experts_of_layer.items()
                        for e in stacked.expert_ids]
                region, facts = b"", ("", "", "")
                if self.rounds is not None:  # the links' handshake rides on this one (ipc: receive-region handles)
                    links = self.rounds.links
                    rank, own = links.attention_rank(message.attention_node), links.expert_rank(self.node_id)
                    try:
                        check_link(links, own, rank, f"attention node {message.attention_node}", message.host,
                                   message.device, message.link)
                        links.attach(rank, message.region)
                        region, facts = links.region_handle(rank), link_facts(links, own, rank)
                    except Exception as exc:  # that attention node learns why at once; the others are served
                        log.exception("expert node %d: links to attention node %d", self.node_id,
                                      message.attention_node)
                        await self.listener.send(peer, ExpertError(-1, -1, -1, f"links: {exc!r}"))
                        continue
                await self.listener.send(peer, HelloReply(self.node_id, held, region, *facts))
                if self.rounds is not None:  # its links are attached: its decode steps can be captured
                    self.rounds.precapture(message.attention_node)
            elif isinstance(message, StepPlan) and self.rounds is not None:
                self.rounds.add(message)
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
                with self.clock.phase("expert_compute"), self.gpu.span():
                    partial = self.compute(layer, [d.hidden for _, d in items], [d.expert_ids for _, d in items],
                                           [d.expert_weights for _, d in items])
                    for _, d in items:  # copied out: their receive memory can take the next dispatches
                        self.listener.recycle(d)
            except Exception as exc:  # answer every sender; the node itself keeps serving
                log.exception("expert node %d: layer %d failed", self.node_id, layer)
                for peer, d in items:
                    await self.listener.send(peer, ExpertError(d.step, d.layer, d.microbatch, repr(exc)))
                continue
            self.tokens_computed += partial.shape[0]
            start = 0
            with self.clock.phase("combine_send"):
                for peer, d in items:
                    end = start + d.hidden.shape[0]
                    await self.listener.send(peer, Combine(d.step, d.layer, d.microbatch, partial[start:end]))
                    start = end

    async def _round_failed(self, attention_node: int, plan: StepPlan, layer: int, microbatch: int,
                            exc: Exception) -> None:
        await self.listener.send(self._peer_of[attention_node], ExpertError(plan.step, layer, microbatch, repr(exc)))

    def compute(self, layer: int, hidden: list[torch.Tensor], ids: list[torch.Tensor],
                weights: list[torch.Tensor], lane: int = 0) -> torch.Tensor:
        """The layer's partial sums of the concatenated pieces: from a CUDA graph where one fits, else eagerly."""
        if self.rounds is not None and layer not in self.experts_of_layer:  # rounds bring every layer to every node
            return torch.zeros(sum(h.shape[0] for h in hidden), hidden[0].shape[1], dtype=hidden[0].dtype,
                               device=hidden[0].device)
        partial = self.graphs[lane].run(layer, hidden, ids, weights) if self.graphs else None
        if partial is None:
            partial = self._experts(layer, *(p[0] if len(p) == 1 else torch.cat(p) for p in (hidden, ids, weights)))
        return partial

    def compute_lane(self, lane: int, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
        """compute for one lane's round (expert_node/lockstep.py), on the lane's stream; on a GPU the phase times the
        host's enqueueing, the meter the device's work."""
        with self.clock.phase("expert_compute"), self.gpu.span():
            return self.compute(layer, [hidden], [ids], [weights], lane)

    def compute_eager(self, lane: int, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
        """compute_lane without this node's graphs: what a whole-step capture records."""
        if layer not in self.experts_of_layer:
            return torch.zeros_like(hidden)
        with self.gpu.span(f"experts, layer {layer}", lane):  # in the capture: timed at every replay
            return self._experts(layer, hidden, ids, weights)

    def warm_up(self, tokens: int, top_k: int) -> None:
        """One eager call of every held layer at `tokens` tokens routed to held experts: Triton compiles the kernel
        variants for that size now, not inside a graph capture (which cannot load a new kernel)."""
        for stacked in self.experts_of_layer.values():
            device, dtype = stacked.gate_up.device, stacked.gate_up.dtype
            held = torch.tensor(stacked.expert_ids, dtype=torch.int32, device=device)
            ids = held[torch.arange(tokens * top_k, device=device) % len(held)].view(tokens, top_k)
            hidden = torch.zeros(tokens, stacked.hidden, dtype=dtype, device=device)
            fused_moe(hidden, ids, torch.ones(tokens, top_k, device=device), stacked, self.moe_backend)

    def warm_up_all(self, max_tokens: int, top_k: int) -> list[int]:
        """warm_up at every size a round of up to max_tokens tokens may take a kernel variant for (before any
        round and any graph capture); returns the sizes."""
        sizes = [1] + warm_up_sizes(max_tokens)
        for tokens in sizes:
            self.warm_up(tokens, top_k)
        return sizes

    def capture_graphs(self, top_k: int, max_tokens: int, lanes: int = 1) -> None:
        """Batches of up to max_tokens tokens replay CUDA graphs from now on (CUDA only); lanes that may run at
        once (on streams of their own) get a set each, since a graph's buffers serve one replay at a time."""
        self.graphs = [ExpertGraphs(self.experts_of_layer, top_k, max_tokens, self._experts) for _ in range(lanes)]

    def _experts(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 expert_weights: torch.Tensor) -> torch.Tensor:
        """Every pair of `layer` that arrived, in one fused call: the unit a CUDA graph can capture. Pairs of
        experts held elsewhere are -1 (the sender masks them) and add nothing."""
        stacked = self.experts_of_layer.get(layer)
        if stacked is None:
            raise KeyError(f"layer {layer} was dispatched to expert node {self.node_id}, which holds none of its "
                           f"experts")
        return fused_moe(hidden, expert_ids, expert_weights, stacked, self.moe_backend)
