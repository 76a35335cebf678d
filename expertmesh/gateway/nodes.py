"""The gateway's control links to every node: status polling and liveness for all of them, and for
attention nodes request submission and token streams. A node that stops answering fails its requests
instead of hanging them."""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from ..transport.base import Connection
from ..transport.protocol import (AbortRequest, AddRequest, Credentials, ExpertStatus, Message, NodeTrace,
                                  SamplingParams, Status, StatusRequest, StepOutputs, TraceControl)

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    token_id: int  # -1 when the event carries no token (abort, error)
    finish_reason: str | None
    error: str | None = None
    logprobs: list | None = None  # [logprob, [[token, logprob], ...]] when asked for
    queue_s: float | None = None  # with the first token: seconds the request waited at the node for its first step
    prompt_logprobs: list | None = None  # with the first token, when asked: StepOutputs.prompt_logprobs' entries


class TokenQueue:
    """One stream's events, for the one task that reads them: get() returns once `wake_at` events wait, or one that
    ends the stream does. A stream that gathers K tokens a chunk (gateway.stream_interval) sets wake_at = K after its
    first chunk, so its task wakes once a chunk, not once a token: a wake-up and the event loop's turn cost about
    as much as the rest of a token's path."""

    def __init__(self) -> None:
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self.wake_at = 1

    def put_nowait(self, event: TokenEvent) -> None:
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done() and self._ready():
            self._waiter.set_result(None)

    def _ready(self) -> bool:
        return len(self._events) >= self.wake_at or (bool(self._events) and self._events[-1].finish_reason is not None)

    async def get(self) -> TokenEvent:
        while not self._ready():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._events.popleft()

    def get_nowait(self) -> TokenEvent:
        return self._events.popleft()  # IndexError when empty

    def empty(self) -> bool:
        return not self._events

    @property
    def waiting(self) -> bool:
        """Its reader waits for more events than have come."""
        return self._waiter is not None and not self._waiter.done()


class NodeLink:
    """Control link to one node: polls its status, declares it dead when silent, fetches its trace."""
    STATUS_INTERVAL_S = 0.25

    def __init__(self, name: str, connection: Connection, node_timeout_s: float, secret: str | None = None) -> None:
        self.name = name
        # presented before every message: a node restarted behind the same address (zmq reconnects on its own)
        # must learn it before anything else that reaches it (transport/peers.py)
        self.credentials = Credentials(secret) if secret is not None else None
        self.connection = connection
        self.node_timeout_s = node_timeout_s
        self.status: Status | ExpertStatus | None = None
        self.last_heard = time.monotonic()
        self.dead: str | None = None  # why, while declared dead
        self.restarts = 0  # times the node came back as a new process
        self._trace: asyncio.Future[NodeTrace] | None = None
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._poll())]
        # at once, not after node_timeout_s of silence: new requests go elsewhere, the node's fail now
        self.connection.on_peer_lost(self._connection_broke)

    @property
    def ready(self) -> bool:
        return self.dead is None and self.status is not None and self.status.ready and \
            time.monotonic() - self.last_heard < self.node_timeout_s

    async def send(self, message: Message) -> None:
        if self.credentials is not None:
            await self.connection.send(self.credentials)
        await self.connection.send(message)

    def on_status(self, message: Status | ExpertStatus) -> None:
        if self.status is not None and message.process != self.status.process:
            self.restarts += 1  # a new process at the same address (the launcher restarted it)
            self.on_restart()
        self.status = message
        if getattr(message, "error", None):
            if self.dead is None:
                self.declare_dead(f"{self.name} failed: {message.error}")
        elif self.dead is not None:
            log.warning("%s answers again (%s before)", self.name, self.dead)
            self.dead = None

    def on_restart(self) -> None:
        """The node came back as a new process: what the old one held is gone."""

    def _connection_broke(self) -> None:
        if self.dead is None:
            self.declare_dead(f"{self.name} is gone (its connection broke)")

    async def trace(self, record: bool, timeout_s: float = 10.0) -> NodeTrace | None:
        """Starts (record=True) or stops the node's timeline; on stop, returns it (None if the node is silent)."""
        self._trace = asyncio.get_running_loop().create_future()
        await self.send(TraceControl(record))
        try:
            return await asyncio.wait_for(self._trace, timeout_s)
        except asyncio.TimeoutError:
            return None

    async def _read(self) -> None:
        while True:
            message = await self.connection.recv()
            self.last_heard = time.monotonic()
            if isinstance(message, (Status, ExpertStatus)):
                self.on_status(message)
            elif isinstance(message, NodeTrace):
                if self._trace is not None and not self._trace.done():
                    self._trace.set_result(message)
            else:
                self.on_message(message)

    def on_message(self, message: Message) -> None:
        log.warning("%s sent unexpected %s", self.name, type(message).__name__)

    async def _poll(self) -> None:
        while True:
            await self.send(StatusRequest())
            await asyncio.sleep(self.STATUS_INTERVAL_S)
            silent_s = time.monotonic() - self.last_heard
            if self.dead is None and self.status is not None and silent_s > self.node_timeout_s:
                self.declare_dead(f"{self.name} has not answered for {silent_s:.1f} s")

    def declare_dead(self, why: str) -> None:
        log.error("%s", why)
        self.dead = why

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.connection.close()


class AttentionNodeClient(NodeLink):
    def __init__(self, index: int, connection: Connection, node_timeout_s: float, secret: str | None = None) -> None:
        super().__init__(f"attention node {index}", connection, node_timeout_s, secret)
        self.index = index
        self.streams: dict[str, TokenQueue] = {}
        self.inflight_tokens: dict[str, int] = {}  # prompt + max tokens of each request, for routing
        # requests routed here whose stream has not submitted them yet: (tokens, when). A streaming response submits
        # when its body is first read, after the handler returns, so a burst routed meanwhile would see none of
        # them and go to the same node (one GPU got 181 of 256 requests, the other 75: RESULTS.md, eleventh session)
        self.claims: dict[str, tuple[int, float]] = {}
        self.requests_routed = 0

    CLAIM_TTL_S = 10.0  # a claim whose stream never started (its client left first) stops counting after this

    @property
    def load_tokens(self) -> int:
        now = time.monotonic()
        return sum(self.inflight_tokens.values()) + sum(tokens for tokens, at in self.claims.values()
                                                        if now - at < self.CLAIM_TTL_S)

    def claim(self, request_id: str, tokens: int) -> None:
        """Counts a request in this node's load from the moment it is routed here, before submit."""
        now = time.monotonic()
        self.claims = {rid: c for rid, c in self.claims.items() if now - c[1] < self.CLAIM_TTL_S}
        self.claims[request_id] = (tokens, now)
        self.requests_routed += 1

    async def submit(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                     prompt_logprobs: int | None = None) -> TokenQueue:
        queue = TokenQueue()
        self.streams[request_id] = queue
        if self.claims.pop(request_id, None) is None:
            self.requests_routed += 1
        self.inflight_tokens[request_id] = len(prompt_ids) + sampling.max_tokens
        await self.send(AddRequest(request_id, prompt_ids, sampling.to_list(), prompt_logprobs))
        return queue

    async def abort(self, request_id: str) -> None:
        if self.forget(request_id) and self.dead is None:
            await self.send(AbortRequest(request_id))

    def forget(self, request_id: str) -> bool:
        self.inflight_tokens.pop(request_id, None)
        self.claims.pop(request_id, None)
        return self.streams.pop(request_id, None) is not None

    def on_message(self, message: Message) -> None:
        if not isinstance(message, StepOutputs):
            return super().on_message(message)
        count = len(message.request_ids)
        for rid, token, reason, error, logprobs, queue_s, prompt_logprobs in zip(
                message.request_ids, message.token_ids, message.finish_reasons, message.errors or [None] * count,
                message.logprobs or [None] * count, message.queue_seconds or [None] * count,
                message.prompt_logprobs or [None] * count):
            queue = self.streams.get(rid)
            if queue is not None:  # else: aborted by us, late tokens are dropped
                queue.put_nowait(TokenEvent(token, reason, error, logprobs, queue_s, prompt_logprobs))
                if reason is not None:
                    self.forget(rid)

    def declare_dead(self, why: str) -> None:
        super().declare_dead(f"{why}; failing its {len(self.streams)} requests")
        self._fail_all(why)

    def on_restart(self) -> None:
        if self.streams:
            log.warning("%s restarted: failing the %d requests the old process held", self.name, len(self.streams))
        self._fail_all(f"{self.name} restarted; the request was lost with the old process")

    def _fail_all(self, why: str) -> None:
        for rid, queue in list(self.streams.items()):
            queue.put_nowait(TokenEvent(-1, "error", why))
            self.forget(rid)
