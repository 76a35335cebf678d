"""The expert node's side of the lockstep M2N (m2n/lockstep.py has the attention node's and the protocol).

Each attention node announces its steps (`StepPlan`); the expert node runs each attention node's steps in a
*lane* of its own: for each (MoE layer, microbatch) round, receive the tokens, compute them, send back the
partial sums. Lanes never wait on each other — on a GPU each has its own CUDA stream — so an attention node
is held up only by its own rounds: with joint rounds across attention nodes, two expert nodes that grouped
different steps together would wait on each other for ever unless every attention node kept one global rhythm.
The host only enqueues: the receives are posted ahead (one round ahead when consecutive rounds use different
microbatch groups, except on links whose receives hold the device: NCCL), the compute waits for them on the device, and a watchdog bounds each step's device time."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable

import torch

from ..cuda_graph import capturing
from ..m2n.links import Links
from ..m2n.lockstep import wait_event
from ..transport.protocol import StepPlan, TensorMeta

log = logging.getLogger(__name__)

# compute(lane, layer, hidden, ids, weights) -> partial sums
Compute = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
OnError = Callable[[int, StepPlan, int, int, Exception], Awaitable[None]]  # (attention node, plan, layer, mb, error)


class LockstepRounds:
    def __init__(self, links: Links, moe_layers: list[int], capacity: int, hidden: int, top_k: int,
                 dtype: torch.dtype, device: str, compute: Compute, recv_timeout_s: float,
                 graph_compute: Compute | None = None, graph_tokens: int = 0,
                 warm_up: Callable[[int], None] | None = None, shapes: list[tuple[int, ...]] = ()) -> None:
        """graph_compute (CUDA, ipc links): steps of the shapes in `shapes` (the attention nodes' whole-step graphs,
        captured ahead: precapture), and others whose microbatches hold at most graph_tokens tokens each, are
        captured whole, once per (attention node, tokens per microbatch), with graph_compute (which must not replay
        graphs of its own), and replayed from then on; warm_up(tokens) runs first for each size, eagerly, so that
        every kernel the capture records is compiled."""
        self.links = links
        self.moe_layers = moe_layers
        self.capacity = capacity
        self.hidden = hidden
        self.device = device
        self.compute = compute
        self.recv_timeout_s = recv_timeout_s
        self.top_k, self.dtype = top_k, dtype
        self.graph_compute, self.graph_tokens, self.warm_up = graph_compute, graph_tokens, warm_up
        self.shapes = list(shapes) if graph_compute is not None else []
        self._shape_set = set(self.shapes)
        self._graphs: dict[tuple[int, tuple[int, ...]], torch.cuda.CUDAGraph | None] = {}
        lanes = range(links.attention_nodes)
        cuda = torch.device(device).type == "cuda"
        self.streams = [torch.cuda.Stream(device) if cuda else None for _ in lanes]
        # a memory pool per lane: graphs that share a pool reuse each other's freed memory, so they must never run at
        # once, and the lanes' streams do
        self._pools = [torch.cuda.graph_pool_handle() if graph_compute is not None else None for _ in lanes]
        self._plans: list[asyncio.Queue[StepPlan]] = [asyncio.Queue() for _ in lanes]
        self.tokens_computed = 0

    def add(self, plan: StepPlan) -> None:
        if not 0 <= plan.attention_node < len(self._plans):
            raise ValueError(f"a step plan from attention node {plan.attention_node}; the world has "
                             f"{len(self._plans)} attention nodes")
        if len(plan.tokens) > self.links.microbatches or max(plan.tokens, default=0) > self.capacity:
            raise ValueError(f"attention node {plan.attention_node}'s step {plan.step} plans {plan.tokens} tokens "
                             f"per microbatch; the links carry {self.links.microbatches} microbatches of at most "
                             f"{self.capacity}")
        log.debug("plan of attention node %d's step %d: %s tokens", plan.attention_node, plan.step, plan.tokens)
        self._plans[plan.attention_node].put_nowait(plan)

    async def serve(self, on_error: OnError) -> None:
        """Runs every lane until one fails (its error is raised)."""
        lanes = [asyncio.create_task(self._lane(a, on_error)) for a in range(len(self._plans))]
        try:
            done, _ = await asyncio.wait(lanes, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in lanes:
                task.cancel()

    async def _lane(self, a: int, on_error: OnError) -> None:
        watchdogs: set[asyncio.Task] = set()
        while True:
            plan = await self._plans[a].get()
            for task in [t for t in watchdogs if t.done()]:
                watchdogs.discard(task)
                task.result()  # a step of this lane that did not finish in time
            self.tokens_computed += await self.run(a, plan, on_error)
            log.debug("attention node %d's step %d enqueued", a, plan.step)
            if self.streams[a] is not None:
                event = torch.cuda.Event()
                event.record(self.streams[a])
                watchdogs.add(asyncio.create_task(self._watch(event, f"attention node {a}'s step {plan.step}")))

    async def _watch(self, event: torch.cuda.Event, what: str) -> None:
        try:
            # not every turn of the loop: the lanes enqueue on this same thread
            await wait_event(event, self.recv_timeout_s, what, poll_s=0.001)
        except Exception as exc:
            log.error("%s (%s)", exc, self.links.progress() or "no link counts")
            self.links.release()  # the lane's stream must not stay stuck behind a dead peer's rounds
            raise

    def _on_lane(self, a: int):
        """The lane's stream as the current one, around work that does not yield (streams are per thread, not
        per coroutine)."""
        return torch.cuda.stream(self.streams[a]) if self.streams[a] is not None else contextlib.nullcontext()

    async def run(self, a: int, plan: StepPlan, on_error: OnError) -> int:
        """Enqueues every round of attention node a's step; returns the tokens computed."""
        graph = self._step_graph(a, plan)
        if graph is not None:
            with self._on_lane(a):
                graph.replay()
            return sum(plan.tokens) * len(self.moe_layers)
        rounds = [(layer, mb, n) for layer in self.moe_layers for mb, n in enumerate(plan.tokens) if n > 0]
        rank = self.links.attention_rank(a)

        def post_receives(i: int) -> tuple[list[torch.Tensor], list]:
            _, mb, n = rounds[i]
            metas = [TensorMeta(self.dtype, (n, self.hidden)), TensorMeta(torch.int32, (n, self.top_k)),
                     TensorMeta(torch.float32, (n, self.top_k))]
            with self._on_lane(a):
                received = self.links.receive(mb, rank, metas)
                self.links.flush()
                return received

        sent, computed = [], 0
        received = post_receives(0) if rounds else ([], [])
        for i, (layer, mb, n) in enumerate(rounds):
            # ahead when the next round is another group's (its stream: no ordering knot), and not on links whose
            # receives hold the device (Links.receives_hold_device)
            ahead = not self.links.receives_hold_device and i + 1 < len(rounds) and rounds[i + 1][1] != mb
            following = post_receives(i + 1) if ahead else None
            views, works = received
            with self._on_lane(a):  # on a GPU the lane's stream waits for the message (the host does not)
                await self.links.wait(works)
            with self._on_lane(a):
                try:
                    partial = self.compute(a, layer, *views)
                    failure = None
                except Exception as exc:  # keep the rhythm with zeros; the sender learns of it on the control path
                    log.exception("expert node: layer %d failed", layer)
                    partial, failure = torch.zeros(n, self.hidden, dtype=self.dtype, device=self.device), exc
                sent += self.links.send(mb, rank, [partial])
                self.links.flush()
            if failure is not None:
                await on_error(a, plan, layer, mb, failure)
            computed += n
            if i + 1 < len(rounds):
                received = following if ahead else post_receives(i + 1)
        if not self.links.device_ordered:
            await self.links.wait(sent)  # the partial sums stay alive until sent (gloo, ucx)
        return computed

    def precapture(self, a: int) -> None:
        """Captures attention node a's steps of every shape in `shapes` (the steps it captures whole), once
        its links are attached, so that none is captured while a step waits for it."""
        started = time.monotonic()
        for shape in self.shapes:
            self._step_graph(a, StepPlan(a, 0, list(shape)))
        if self.shapes:
            log.info("captured attention node %d's steps of %d shapes in %.1f s", a, len(self.shapes),
                     time.monotonic() - started)

    def _step_graph(self, a: int, plan: StepPlan) -> torch.cuda.CUDAGraph | None:
        """The captured step for plan's shape (captured now if new), or None where steps run eagerly."""
        shape = tuple(plan.tokens)
        if self.graph_compute is None or (shape not in self._shape_set
                                          and not all(0 < n <= self.graph_tokens for n in shape)):
            return None
        key = (a, shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(a, plan)
        return self._graphs[key]

    def _capture(self, a: int, plan: StepPlan) -> torch.cuda.CUDAGraph | None:
        rank = self.links.attention_rank(a)
        graph = torch.cuda.CUDAGraph()
        try:
            if self.warm_up is not None:
                with self._on_lane(a):
                    for n in sorted(set(plan.tokens)):
                        self.warm_up(n)
            with capturing(graph, self._pools[a]):
                for layer in self.moe_layers:
                    for mb, n in enumerate(plan.tokens):
                        metas = [TensorMeta(self.dtype, (n, self.hidden)), TensorMeta(torch.int32, (n, self.top_k)),
                                 TensorMeta(torch.float32, (n, self.top_k))]
                        views, works = self.links.receive(mb, rank, metas)
                        self.links.enqueue_wait(works)
                        self.links.send(mb, rank, [self.graph_compute(a, layer, *views)])
        except Exception:  # this shape runs eagerly from now on
            log.exception("expert node: capturing attention node %d's step of %s tokens failed", a, plan.tokens)
            return None
        log.debug("captured attention node %d's step of %s tokens per microbatch", a, plan.tokens)
        return graph
