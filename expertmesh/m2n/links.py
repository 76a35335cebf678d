"""Point-to-point links of fixed capacity between the cluster's nodes: the lockstep M2N's transport.

Every node has a *rank*: attention node a is rank a, expert node e is rank attention_nodes + e. A link has one
receive slot per microbatch, sized once for the largest message a step can carry. The messages of one microbatch
on a link come in the same order on both sides (the lockstep schedule guarantees it per microbatch; across
microbatches the order varies with timing), so a receiver knows where the next one lands before it arrives
(NCCL, gloo and UCX match them in order; ipc counts them on the device), and a sender never needs an answer to know
where to write. One slot per microbatch suffices: a microbatch's next message to a node always follows that
node's answer to its previous one, and the answer follows the work that read the slot (m2n/lockstep.py).

Backends: dist.py (torch.distributed: NCCL between GPUs, gloo between CPU processes), ipc.py (CUDA IPC
between processes of one host, one GPU or several) and ucx_links.py (UCX: CPU, or RDMA across hosts); mixed.py
holds several at once, a backend per peer by link_plan.py's rule."""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Sequence

import torch

from ..transport.protocol import TensorMeta, packed_offsets

if TYPE_CHECKING:
    from ..config import Config
    from .link_plan import LinkPlan


class Links(abc.ABC):
    backend: str
    device_ordered = False  # sends and waits are ordered on the current CUDA stream, no host wait (nccl, ipc)
    # A posted receive runs on the device until its message comes (nccl: a kernel). The device then never drains,
    # and CUDA loads a kernel used for the first time only once it has: a receive posted ahead of a compute that
    # loads one waits for the peer's next message, which waits for that compute (seen as a deadlock on 2 x H200).
    receives_hold_device = False
    plan: "LinkPlan | None" = None  # the cluster's links, set by make_links: what the handshake says of each

    def __init__(self, attention_nodes: int, microbatches: int, slot_bytes: int) -> None:
        self.attention_nodes = attention_nodes
        self.microbatches = microbatches  # receive slots per link
        self.slot_bytes = slot_bytes

    def attention_rank(self, node: int) -> int:
        return node

    def expert_rank(self, node: int) -> int:
        return self.attention_nodes + node

    def _check(self, peer: int, microbatch: int, metas: Sequence[TensorMeta]) -> None:
        """A message of these tensors fits a slot of this link."""
        nbytes = packed_offsets(metas)[1]
        if nbytes > self.slot_bytes:
            raise ValueError(f"a message of {nbytes} bytes to or from rank {peer}; the link's slots hold "
                             f"{self.slot_bytes} (sized from engine.max_batch_tokens)")
        if not 0 <= microbatch < self.microbatches:
            raise ValueError(f"microbatch {microbatch}; the links have slots for {self.microbatches}")

    @abc.abstractmethod
    def send(self, microbatch: int, peer: int, tensors: Sequence[torch.Tensor]) -> list:
        """Sends the tensors to `peer` as its next message; returns what to wait on before they may change. A
        backend may hold sends and receives back until flush (a wait flushes)."""

    @abc.abstractmethod
    def receive(self, microbatch: int, peer: int, metas: Sequence[TensorMeta]) -> tuple[list[torch.Tensor], list]:
        """Posts the receive of the next message from `peer`: (views of its tensors in the receive slot, what to
        wait on before reading them)."""

    def flush(self) -> None:
        """Starts what send and receive held back (a round's operations, together)."""

    @abc.abstractmethod
    async def wait(self, works: list) -> None:
        """Orders what follows after `works`: on GPUs by making the current stream wait (the host does not)."""

    def enqueue_wait(self, works: list) -> None:
        """wait, for device-ordered links: enqueues the wait on the current stream (also inside graph capture)."""
        raise NotImplementedError(f"{self.backend} links wait on the host")

    def region_handle(self, peer: int) -> bytes:
        """What `peer` needs to reach this node's receive slots for it, sent in the handshake (ipc: a handle; ucx:
        the worker's address)."""
        return b""

    def attach(self, peer: int, handle: bytes) -> None:
        """Takes what `peer` sent in the handshake (its region_handle for this node)."""

    def progress(self) -> str:
        """Where the rounds stand, for an error after a timeout (ipc: each slot's message counts); "" if unknown."""
        return ""

    def release(self) -> None:
        """After a peer failed: lets every wait posted on this side's streams pass, so nothing stays stuck."""

    def close(self) -> None:
        """Frees what the links hold."""


def slot_bytes_for(tokens: int, hidden: int, dtype: torch.dtype, top_k: int) -> int:
    """A slot for the largest message either way: a round's tokens with their expert ids and weights."""
    return packed_offsets([TensorMeta(dtype, (tokens, hidden)), TensorMeta(torch.int32, (tokens, top_k)),
                           TensorMeta(torch.float32, (tokens, top_k))])[1]


def make_links(config: "Config", role: str, index: int, device: str, hidden: int, dtype: torch.dtype,
               top_k: int) -> Links:
    """The links of node `index` of `role` ("attention" or "expert"), by config.transport.backend (lockstep: each
    peer's by link_plan.py), with the cluster's LinkPlan as `plan`."""
    from .link_plan import PER_LINK, plan_links
    cluster, engine, t = config.cluster, config.engine, config.transport
    rank = index if role == "attention" else cluster.attention_nodes + index
    slot_bytes = slot_bytes_for(engine.max_batch_tokens, hidden, dtype, top_k)
    peers = ([cluster.attention_nodes + e for e in range(cluster.expert_nodes)] if role == "attention"
             else list(range(cluster.attention_nodes)))
    plan = plan_links(config)
    if t.backend == PER_LINK:
        from .mixed import make_mixed_links
        links = make_mixed_links(config, plan, rank, peers, device, slot_bytes)
    else:
        links = _one_backend(config, rank, peers, device, slot_bytes)
    links.plan = plan
    return links


def _one_backend(config: "Config", rank: int, peers: list[int], device: str, slot_bytes: int) -> Links:
    """Every link over config.transport.backend."""
    if config.transport.backend in ("ipc", "ucx-lockstep"):
        return links_over(config, config.transport.backend, rank, peers, device, slot_bytes)
    from .dist import join_cluster
    return join_cluster(config, rank, device, slot_bytes)


def links_over(config: "Config", backend: str, rank: int, peers: list[int], device: str, slot_bytes: int) -> Links:
    """The links of rank `rank` to `peers` over ipc or ucx-lockstep (nccl and gloo links join a world: dist.py)."""
    cluster, engine, t = config.cluster, config.engine, config.transport
    if backend == "ipc":
        from .ipc import IpcLinks
        return IpcLinks(cluster.attention_nodes, rank, peers, engine.microbatches, slot_bytes, device,
                        t.recv_timeout_s, t.ipc_copy)
    if backend == "ucx-lockstep":
        from .ucx_links import UcxLinks
        return UcxLinks(cluster.attention_nodes, rank, peers, engine.microbatches, slot_bytes, device,
                        t.recv_timeout_s, t.ucx_progress_mode)
    raise ValueError(f"links_over makes ipc or ucx-lockstep links, not {backend!r}")
