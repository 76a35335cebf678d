"""The attention node's side of the lockstep M2N: no host on the data's path.

Once per step the attention node tells every expert node the step's shape (`StepPlan`: tokens per microbatch)
on the control connection. Then every (microbatch, MoE layer) is one *round*: the attention node sends every
expert node the round's tokens, whether or not they chose one of its experts (the expert ids of experts held
elsewhere are -1, which its fused MoE skips), and receives one partial sum per token from each. Every size is
known on both sides from the plan, so each side posts its receives ahead into buffers of fixed capacity and
nothing waits on the device: the masking is device work, the sends and receives are stream-ordered (NCCL), and
the host waits once per step, with a deadline, for the step's end.

Sending every token to every node trades bytes for that: with N expert nodes a token goes to all N instead of
to those holding its experts (for top-8 of 128 experts over 4 nodes, nearly all of them anyway)."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch

from ..placement.plan import Placement
from ..placement.replication import choose_replica
from ..transport.base import Connection, TransportError
from .handshake import ExpertNodeError, greet_expert_nodes
from .messages import LinkStats
from ..transport.protocol import ExpertError, StepPlan, TensorMeta
from .links import Links

log = logging.getLogger(__name__)


class RoundCapacityError(ValueError):
    """A step would carry more tokens in one microbatch than the M2N buffers were sized for."""


@dataclass
class RoundHandle:
    microbatch: int
    works: list  # the links' sends and receives of the round
    answers: list[torch.Tensor]  # each expert node's partial sums, in its receive slot


async def wait_event(event: torch.cuda.Event, timeout_s: float, what: str, poll_s: float = 0.0) -> None:
    """Waits, without blocking the event loop, until the device has passed `event`; TransportError after
    timeout_s (a peer that died mid-round leaves its receives pending for ever). poll_s 0 polls at every turn of
    the loop (a step's end, which the host is waiting for); a watchdog polls less often."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not event.query():
        if loop.time() > deadline:
            raise TransportError(f"{what} did not complete within {timeout_s} s: an expert node is gone or stuck")
        await asyncio.sleep(poll_s)


def _sum(answers: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The sum of the nodes' partial sums. With one expert node, its receive slot itself: valid until the
    microbatch's next rounds, which are posted only after the work reading it (stream order)."""
    out = answers[0]
    for answer in answers[1:]:
        out = out + answer
    return out.to(dtype)


class LockstepClient:
    """ExpertBackend (model_runner.py) over lockstep rounds on Links (links.py)."""

    def __init__(self, connections: list[Connection], links: Links, placement: Placement, attention_node: int,
                 capacity: int, hidden: int, dtype: torch.dtype, microbatches: int, device: str,
                 recv_timeout_s: float, attention_domain: int = 0, expert_domain: list[int] | None = None) -> None:
        self.connections = connections
        self.links = links
        self.placement = placement
        self.attention_node = attention_node
        self.capacity = capacity
        self.device = device
        self.recv_timeout_s = recv_timeout_s
        n = len(connections)
        domains = expert_domain or [0] * n
        # the replica each expert's tokens go to: one in this node's domain, fixed (the rounds carry every token
        # to every node anyway, so a per-step load balance would move no bytes, only compute)
        self.node_of = {layer: torch.tensor([choose_replica(nodes, attention_domain, domains, [0] * n, None)
                                             for nodes in experts], dtype=torch.int32, device=device)
                        for layer, experts in placement.nodes_of.items()}
        self._node_ids = torch.arange(n, dtype=torch.int32, device=device).view(-1, 1, 1)
        self.hidden, self.dtype, self.microbatches = hidden, dtype, microbatches
        self.stats = LinkStats([0] * n, [0] * n, [0] * n)
        self._errors: list[str] = []
        self._readers: list[asyncio.Task] = []
        self._step: int | None = None

    async def handshake(self, num_layers: int, num_experts: int, timeout_s: float) -> None:
        """Greets every expert node on the control connection and checks it holds what the placement says."""
        await greet_expert_nodes(self.connections, self.placement, self.attention_node, num_layers, num_experts,
                                 timeout_s, self.links)
        self._readers = [asyncio.create_task(self._read(node)) for node in range(len(self.connections))]

    async def _read(self, node: int) -> None:
        """The control connection after the handshake carries only an expert node's failures."""
        try:
            while True:
                message = await self.connections[node].recv()
                if isinstance(message, ExpertError):
                    self._errors.append(f"expert node {node}, layer {message.layer}: {message.error}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._errors.append(f"control link to expert node {node} failed: {exc!r}")

    @property
    def link_backends(self) -> list[str]:
        """The backend of the link to each expert node (with transport.backend=lockstep, each link's own)."""
        plan, rank = self.links.plan, self.attention_node
        return [plan.between(rank, self.links.expert_rank(node)) if plan is not None else self.links.backend
                for node in range(len(self.connections))]

    @property
    def captures_steps(self) -> bool:
        """Whether whole decode steps, rounds included, can be captured as CUDA graphs: the links keep every count
        on the device (ipc), so a replay needs no host."""
        return self.links.backend == "ipc"

    async def begin_step(self, step: int, tokens: list[int]) -> None:
        """Announces the step's rounds (tokens of each microbatch) to every expert node."""
        if self._errors:
            raise ExpertNodeError(self._errors[0])
        if len(tokens) > self.microbatches:
            raise RoundCapacityError(f"{len(tokens)} microbatches, the links were set up for {self.microbatches}")
        if max(tokens, default=0) > self.capacity:
            raise RoundCapacityError(f"a microbatch of {max(tokens)} tokens, the M2N buffers hold {self.capacity} "
                                     f"(engine.max_batch_tokens)")
        self._step = step
        log.debug("step %d: %s tokens per microbatch", step, tokens)
        plan = StepPlan(self.attention_node, step, list(tokens))
        for conn in self.connections:
            await conn.send(plan)
        # In zmq's hands before any round is enqueued: else a host call that keeps the GIL while it waits for the
        # device (Triton's first load of a kernel) could keep the plan in the socket thread while the device waits
        # on an expert node that waits for the plan. Awaited here, not in the first dispatch: there, the microbatch
        # that arrived second could enqueue its round while the first waited, and on device-ordered links
        # (ipc, NCCL) its wait for its answer would then hold up the first's send, which the expert node needs
        # first (the rounds' order is (layer, microbatch) on both sides): a deadlock on 2 x H200.
        await asyncio.gather(*(conn.flushed() for conn in self.connections))

    async def dispatch(self, step: int, layer: int, microbatch: int, hidden: torch.Tensor,
                       expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> RoundHandle:
        """Sends the round's tokens to every expert node and posts the receives of their answers."""
        if step != self._step:
            raise RuntimeError(f"dispatch for step {step} before begin_step announced it (at {self._step})")
        return self.enqueue_round(layer, microbatch, hidden, expert_ids, expert_weights)

    def enqueue_round(self, layer: int, microbatch: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                      expert_weights: torch.Tensor) -> RoundHandle:
        """dispatch's work, all of it enqueued (on device-ordered links it can be captured in a CUDA graph)."""
        n = hidden.shape[0]
        owner = self.node_of[layer][expert_ids.long()]
        masked = torch.where(owner.unsqueeze(0) == self._node_ids, expert_ids.unsqueeze(0), -1)  # [nodes, n, k]
        works, answers, answer_meta = [], [], [TensorMeta(self.dtype, (n, self.hidden))]
        # the sends to every expert node, then the receives of their answers: each side of a link posts one direction
        # at a time (NCCL leaves a group of a send and a receive, met by the two apart, undefined; it hung)
        for node in range(len(self.connections)):
            works += self.links.send(microbatch, self.links.expert_rank(node), [hidden, masked[node], expert_weights])
            self.stats.bytes_sent[node] += hidden.nbytes + masked[node].nbytes + expert_weights.nbytes
            self.stats.messages_sent[node] += 1
        for node in range(len(self.connections)):
            (answer,), posted = self.links.receive(microbatch, self.links.expert_rank(node), answer_meta)
            works += posted
            answers.append(answer)
            self.stats.bytes_received[node] += answer.nbytes
        self.links.flush()
        return RoundHandle(microbatch, works, answers)

    async def gather(self, handle: RoundHandle) -> list[torch.Tensor]:
        await asyncio.sleep(0)  # the other microbatches enqueue their rounds first: ping-pong order on the device
        await self.links.wait(handle.works)
        return handle.answers

    def enqueue_combine(self, handle: RoundHandle, dtype: torch.dtype) -> torch.Tensor:
        """gather and reduce, enqueued on the current stream (device-ordered links only)."""
        self.links.enqueue_wait(handle.works)
        return _sum(handle.answers, dtype)

    def reduce(self, handle: RoundHandle, answers: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return _sum(answers, like.dtype)

    async def end_step(self, step: int, event: torch.cuda.Event | None = None) -> None:
        """Waits, with the receive deadline, for the step's rounds to finish on the device: until `event`, recorded
        after them (async scheduling records it before enqueueing the next step), or all enqueued work so far."""
        log.debug("step %d: waiting for its rounds", step)
        if torch.device(self.device).type == "cuda":
            if event is None:
                event = torch.cuda.Event()
                event.record()
            try:
                await wait_event(event, self.recv_timeout_s, f"step {step}'s M2N rounds")
            except TransportError as exc:
                progress = self.links.progress()
                self.links.release()  # the stream must not stay stuck behind a dead peer's rounds
                raise TransportError(f"{exc}{' (' + progress + ')' if progress else ''}") from None
        if self._errors:
            raise ExpertNodeError(self._errors[0])

    async def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        for conn in self.connections:
            await conn.close()
        self.links.close()
