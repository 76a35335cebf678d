"""The attention node: takes requests from the gateway, runs continuous batching, streams tokens back.

Two coroutines share one event loop: `_control` answers the gateway, `_engine` runs steps while there is
work. A failed step fails only its requests. An expert node lost over the message M2N is routed around
(m2n/messages.py): while some experts have no live node, steps wait for it to rejoin (bounded). Over lockstep
links a lost expert node stops this node, and the launcher the cluster."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import torch

from ..config import Config
from ..model.spec import ModelSpec
from ..transport.base import Listener, PeerId, TransportError
from ..transport.peers import PeerGate
from ..m2n.messages import LinkStats, M2NClient
from ..transport.protocol import (AbortRequest, AddRequest, NodeTrace, SamplingParams, Status, StatusRequest,
                                  StepOutputs, TraceControl)
from . import prompt_logprobs
from .model_runner import ModelRunner
from ..host_copy import to_device
from ..ops.sampling import token_logprobs
from .sampler import needs_host_tokens, request_seed, sample_tokens
from .scheduler import Scheduler, Sequence

log = logging.getLogger(__name__)


@dataclass
class Launched:
    """A step on the device: its rows (row, sequence), sampled tokens, these copied to the host without a wait, and
    the logits of the rows that asked for logprobs (copied out: a graph's output is the next replay's too); what
    its outputs carry beside the tokens; whether its sequences hold PLACEHOLDER for them."""
    step: int
    rows: list[tuple[int, Sequence]]
    logits: dict[int, torch.Tensor]  # row -> its logits, for the rows whose request asked for logprobs
    tokens: torch.Tensor  # [rows] int64 on the logits' device
    host: torch.Tensor  # their host copy, complete once `copied` has passed (None: the same tensor, on the CPU)
    copied: torch.cuda.Event | None
    queue_seconds: list[float | None]
    prompt_entries: list
    chunks: list[Sequence]  # the step's other sequences: fed a chunk inside their prompt, they sample nothing
    held: bool = False

    async def host_tokens(self) -> list[int]:
        while self.copied is not None and not self.copied.query():
            await asyncio.sleep(0)  # the event loop keeps serving the gateway meanwhile
        return self.host.tolist()


class AttentionNode:
    def __init__(self, node_id: int, config: Config, spec: ModelSpec, runner: ModelRunner, scheduler: Scheduler,
                 m2n: M2NClient | None, control: Listener) -> None:
        self.node_id = node_id
        self.config = config
        self.spec = spec
        self.runner = runner
        self.scheduler = scheduler
        self.m2n = m2n
        self.control = control
        self.serving = False
        self.step = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps_held = 0  # steps whose tokens stayed on the device while the next one was launched
        self.async_scheduling = config.engine.async_scheduling_on(config.model.device)
        self.fatal_error: str | None = None
        # request id -> the gateway that submitted it, where its outputs go (gateways may share the node, and one
        # restarted is a new peer); dropped with the request's last output
        self._peer_of: dict[str, PeerId] = {}
        self.gate = PeerGate(config.cluster.secret, f"attention node {node_id} (control)")
        self._work = asyncio.Event()
        self._grammars = None  # GrammarCompiler, made (and xgrammar imported) at the first request with a grammar
        self._compiling: set[str] = set()  # requests whose grammar compiles: an abort meanwhile drops them

    @property
    def ready(self) -> bool:
        """Serving, and every expert reachable (the gateway sends new requests elsewhere, or holds them, meanwhile)."""
        return self.serving and self.experts_available

    @property
    def experts_available(self) -> bool:
        available = getattr(self.m2n, "available", None)  # the message M2N's; lockstep links stop instead
        return available is None or available.is_set()

    async def serve(self) -> None:
        """Runs until lockstep expert links fail (raises) or the task is cancelled."""
        self.serving = True
        control = asyncio.create_task(self._control())
        try:
            await self._engine()
        finally:
            control.cancel()

    async def _control(self) -> None:
        while True:
            peer, message = await self.control.recv()
            if not self.gate.admits(peer, message):
                continue
            if isinstance(message, AddRequest):
                self._peer_of[message.request_id] = peer
                self._add(message)
            elif isinstance(message, AbortRequest):
                seq = self.scheduler.abort(message.request_id)
                if seq is not None and seq not in self.scheduler.running:  # waiting or prefilling: nothing to wait for
                    await self._send([seq.request_id], [-1], ["abort"], [None])
                elif message.request_id in self._compiling:
                    self._compiling.discard(message.request_id)
                    await self._send([message.request_id], [-1], ["abort"], [None])
                self._peer_of.pop(message.request_id, None)  # its gateway has let it go: later tokens are dropped
            elif isinstance(message, StatusRequest):
                await self.control.send(peer, self.status())
            elif isinstance(message, TraceControl):
                events = self.runner.clock.toggle_trace(message.record)
                gpu = [] if message.record else self.runner.gpu.timeline()
                await self.control.send(peer, NodeTrace(f"attention node {self.node_id}", events, gpu))

    def _add(self, message: AddRequest) -> None:
        sampling = SamplingParams.from_list(message.sampling)
        seq = Sequence(message.request_id, list(message.prompt_ids), sampling,
                       request_seed(sampling, fallback_seed=time.time_ns() % 2**63), arrived_s=time.monotonic(),
                       prompt_logprobs_n=message.prompt_logprobs)
        if sampling.grammar is not None:
            asyncio.create_task(self._add_with_grammar(seq))
            return
        self._queue(seq)

    def _queue(self, seq: Sequence) -> None:
        try:
            self.scheduler.add(seq)
        except ValueError as exc:
            asyncio.create_task(self._send([seq.request_id], [-1], ["error"], [str(exc)]))
            return
        self._work.set()

    async def _add_with_grammar(self, seq: Sequence) -> None:
        """Compiles the request's grammar off the event loop (a new schema may take a while on a large vocabulary;
        a known one is a cache hit), then queues it, unless it was aborted meanwhile."""
        self._compiling.add(seq.request_id)
        error = None
        try:
            if self._grammars is None:
                from .grammar import GrammarCompiler, tokenizer_info
                info = await asyncio.to_thread(tokenizer_info, self.config.model.path, self.spec.vocab_size,
                                               tuple(self.scheduler.eos_token_ids))
                self._grammars = self._grammars or GrammarCompiler(info)
            seq.grammar = await asyncio.to_thread(self._grammars.state, *seq.sampling.grammar)
        except Exception as exc:  # a request must fail, never hang (the gateway checks sources: this is rare)
            error = str(exc)
        if seq.request_id not in self._compiling:  # aborted meanwhile, and answered then
            return
        self._compiling.discard(seq.request_id)
        if error is not None:
            await self._send([seq.request_id], [-1], ["error"], [error])
        else:
            self._queue(seq)

    def status(self) -> Status:
        s = self.m2n.stats if self.m2n is not None else LinkStats([], [], [])  # colocated: no links
        phases, seconds, wall = self.runner.clock.totals()
        return Status(self.node_id, self.ready and self.fatal_error is None, len(self.scheduler.running),
                      len(self.scheduler.waiting), self.scheduler.queued_tokens, self.prompt_tokens,
                      self.generated_tokens, self.step, list(s.bytes_sent), list(s.messages_sent),
                      list(s.bytes_received), self.fatal_error, phases, seconds, wall,
                      self.scheduler.blocks.num_used_blocks, self.scheduler.blocks.num_blocks,
                      self.scheduler.num_preemptions, os.getpid(), *self.runner.gpu.totals(),
                      link_backends=getattr(self.m2n, "link_backends",  # the message M2N: one for all
                                            [self.config.transport.backend] * len(s.bytes_sent)),
                      eager_steps=self.runner.eager_steps)

    async def _engine(self) -> None:
        """Steps while there is work. With engine.async_scheduling, step N+1 is scheduled and launched while step N
        runs, its decode inputs taken from N's sampled tokens on the device (Scheduler.hold), and N's tokens come
        back to the host, are sent and retire what finished while N+1 runs: the host's work between steps leaves
        the device's critical path. A sequence that N finished by a stop token wastes its N+1 row; one whose
        next draw reads its last token on the host (penalties, grammars) makes the node wait for it first."""
        held: Launched | None = None  # the running step whose tokens are not on the host yet
        while True:
            if held is None:
                await self._work.wait()
            if not self.experts_available:
                held = await self._settle(held)
                await self._wait_for_experts()
                continue
            if held is not None and any(needs_host_tokens(seq) for _, seq in held.rows):
                held = await self._settle(held)
            with self.runner.clock.phase("schedule"):
                seqs = self.scheduler.schedule()
            if not seqs:
                if held is None:
                    self._work.clear()
                held = await self._settle(held)
                continue
            self.step += 1
            started = time.monotonic()
            for seq in seqs:
                if seq.queue_s is None:
                    seq.queue_s = started - seq.arrived_s
            try:
                launched = await self._launch(self.step, seqs, held)
            except Exception as exc:
                finished = set() if held is None else {id(seq) for seq in await self._settle_rows(held)}
                await self._step_failed([seq for seq in seqs if id(seq) not in finished], exc)
                held = None
                continue
            finished = set()
            if held is not None:  # the previous step's tokens, back while this one runs
                finished = {id(seq) for seq in await self._settle_rows(held)}
            held = None
            # a sequence the previous step finished (a stop token) wasted its row here: its token is dropped
            launched.rows = [(row, seq) for row, seq in launched.rows if id(seq) not in finished]
            if self.async_scheduling and not any(needs_host_tokens(seq) for seq in seqs):
                for _, seq in launched.rows:
                    self.scheduler.hold(seq)
                launched.held, held = True, launched
                self.steps_held += 1
            else:
                await self._settle(launched)

    async def _launch(self, step: int, seqs: list[Sequence], held: Launched | None) -> Launched:
        """Enqueues the step and its sampling; nothing waits for the device but an eager step's own rounds."""
        self.runner.held_tokens = None if held is None else (held.tokens, {id(seq): row for row, seq in held.rows})
        try:
            logits = await self.runner.forward(step, seqs, self.config.engine.microbatches, end_step=False)
        finally:
            self.runner.held_tokens = None
        with self.runner.clock.phase("sample"):
            tokens = sample_tokens(logits, seqs, tuple(self.scheduler.eos_token_ids))
            copied = None
            if tokens.is_cuda:  # to the host without a wait: a pinned buffer and an event
                host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                host.copy_(tokens, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            else:
                host = tokens
        rows, entries, chunks = [], [], []  # the sequences whose token this step samples, their prompt logprobs
        for row, seq in enumerate(seqs):
            if seq.num_cached == 0 and not seq.output_ids:  # not again when a preempted sequence is readmitted
                self.prompt_tokens += len(seq.prompt_ids)
            if seq.samples:
                rows.append((row, seq))
                entries.append(prompt_logprobs.finished(seq))
            else:  # a chunk inside its prompt: its next chunk's inputs are known, it may be scheduled at once
                self.scheduler.advance_chunk(seq)
                entries.append(None)
                chunks.append(seq)
        # with its first token, how long the request waited for its first step, and its prompt's logprobs
        asked = [row for row, seq in rows if seq.sampling.logprobs is not None]
        kept = dict(zip(asked, logits[to_device(asked, logits.device)])) if asked else {}
        return Launched(step, rows, kept, tokens, host, copied,
                        [None if seq.output_ids else seq.queue_s for seq in seqs], entries, chunks)

    async def _settle(self, launched: Launched | None) -> None:
        """Retires a launched step (if any): its tokens to their sequences and the gateway. Returns None."""
        if launched is not None:
            await self._settle_rows(launched)
        return None

    async def _settle_rows(self, launched: Launched) -> list[Sequence]:
        """_settle; returns the sequences that finished with it. A failure fails the step's requests."""
        try:
            await self.runner.finish_step(launched.step)
            with self.runner.clock.phase("sample"):
                tokens = await launched.host_tokens()
        except Exception as exc:  # a chunk's K/V may be lost too: its sequence fails with the step
            seqs = [seq for _, seq in launched.rows]
            seqs += [seq for seq in launched.chunks if seq in self.scheduler.running]
            await self._step_failed(seqs, exc)
            return seqs
        with self.runner.clock.phase("settle"):  # the tokens to their sequences and the gateways
            request_ids, out, reasons, logprobs, queue_seconds, prompt_entries, finished = [], [], [], [], [], [], []
            for row, seq in launched.rows:
                token = tokens[row]
                reason = self.scheduler.fill(seq, token) if launched.held else self.scheduler.advance(seq, token)
                self.generated_tokens += 1
                request_ids.append(seq.request_id)
                out.append(token)
                reasons.append(reason)
                logprobs.append(None if seq.sampling.logprobs is None else
                                token_logprobs(launched.logits[row], token, seq.sampling.logprobs))
                queue_seconds.append(launched.queue_seconds[row])
                prompt_entries.append(launched.prompt_entries[row])
                if reason is not None:
                    finished.append(seq)
            await self._send(request_ids, out, reasons, [None] * len(request_ids), logprobs, queue_seconds,
                             prompt_entries)
            return finished

    async def _step_failed(self, seqs: list[Sequence], exc: Exception) -> None:
        """Fails the step's requests; raises where this node cannot serve any more (lockstep links lost)."""
        fatal = isinstance(exc, TransportError) and not getattr(self.m2n, "rejoins", False)
        if fatal:  # lockstep links: the message M2N's rejoin has no counterpart there
            exc = TransportError(f"{exc}; lockstep M2N links ({self.config.transport.backend}) cannot take "
                                 f"a restarted expert node alone: the launcher restarts every attention "
                                 f"and expert node")
        if isinstance(exc, TransportError):  # a lost link: its message says all, a traceback would not
            log.error("attention node %d: step %d failed: %s", self.node_id, self.step, exc)
        else:
            log.exception("attention node %d: step %d failed", self.node_id, self.step)
        for seq in seqs:
            self.scheduler.release(seq)
        await self._send([s.request_id for s in seqs], [-1] * len(seqs), ["error"] * len(seqs),
                         [f"step failed: {exc}"] * len(seqs))
        if fatal:
            await self._fatal(exc)

    async def _wait_for_experts(self) -> None:
        """Some experts have no live expert node (theirs was lost, without replicas): no step can run until it
        rejoins. Requests wait for that at most transport.rejoin_wait_s, then fail with the reason."""
        wait_s = self.config.transport.rejoin_wait_s
        try:
            await asyncio.wait_for(self.m2n.available.wait(), wait_s)
        except asyncio.TimeoutError:
            why = f"{self.m2n.why_unavailable()}; gave up after {wait_s} s"
            log.error("attention node %d: %s", self.node_id, why)
            running = list(self.scheduler.running)
            for seq in running:
                self.scheduler.release(seq)
            if running:
                await self._send([s.request_id for s in running], [-1] * len(running), ["error"] * len(running),
                                 [why] * len(running))
            await self._fail_waiting(why)
            self._work.clear()  # until the next request: a new wait, a new bound

    async def _fatal(self, exc: Exception) -> None:
        """Fails every waiting request with exc and raises it: this node cannot serve any more."""
        self.fatal_error = str(exc)
        await self._fail_waiting(str(exc))
        raise exc

    async def _fail_waiting(self, error: str) -> None:
        waiting = list(self.scheduler.waiting)
        self.scheduler.waiting.clear()
        if waiting:
            await self._send([s.request_id for s in waiting], [-1] * len(waiting), ["error"] * len(waiting),
                             [error] * len(waiting))

    async def _send(self, request_ids: list[str], tokens: list[int], reasons: list[str | None],
                    errors: list[str | None], logprobs: list | None = None,
                    queue_seconds: list[float | None] | None = None, prompt_entries: list | None = None) -> None:
        """One StepOutputs to each gateway with requests among these rows, carrying its requests' rows."""
        none = [None] * len(request_ids)
        columns = (request_ids, tokens, reasons, errors, logprobs or none, queue_seconds or none,
                   prompt_entries or none)
        rows_of: dict[PeerId, list[int]] = {}
        for row, (request_id, reason) in enumerate(zip(request_ids, reasons)):
            peer = self._peer_of.get(request_id) if reason is None else self._peer_of.pop(request_id, None)
            if peer is not None:  # else: aborted by its gateway, or finished: the row is dropped
                rows_of.setdefault(peer, []).append(row)
        for peer, rows in rows_of.items():
            if len(rows) == len(request_ids):  # the usual case: one gateway
                await self.control.send(peer, StepOutputs(*columns))
            else:
                await self.control.send(peer, StepOutputs(*([column[row] for row in rows] for column in columns)))
