"""Links over torch.distributed point to point: NCCL between GPUs, gloo between CPU processes.

Every node of the cluster is one rank of one world. Each (attention node, microbatch) gets a process group of its
own — the attention node and every expert node — so on NCCL its sends and receives queue on a stream of their
own: one microbatch waiting for its answer never holds up another's dispatch (ping-pong), and an expert node's
lanes (one per attention node) never wait on each other's streams. Sends and receives are stream-ordered on NCCL (the host never waits for them);
gloo's are waited on in a thread, so that the event loop keeps serving."""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist

from ..transport.base import TransportError
from ..transport.protocol import TensorMeta, packed_offsets, packed_views
from .links import Links

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)


class DistLinks(Links):
    def __init__(self, backend: str, attention_nodes: int, rank: int, groups: dict[tuple[int, int], object],
                 microbatches: int, slot_bytes: int, device: str, timeout_s: float) -> None:
        super().__init__(attention_nodes, microbatches, slot_bytes)
        self.backend = backend  # "nccl" or "gloo"
        self.device_ordered = self.receives_hold_device = backend == "nccl"
        self.rank = rank
        self.groups = groups  # (attention node, microbatch) -> its process group, for the groups this rank is in
        self.device = device
        self.timeout_s = timeout_s  # gloo waits raise after this; NCCL's are bounded by the caller (wait_event)
        self._slots: dict[tuple[int, int], torch.Tensor] = {}  # (peer, microbatch) -> receive slot, made once
        self._send_slots: dict[tuple[int, int], torch.Tensor] = {}  # (peer, microbatch) -> where a message packs
        # Operations are batched until flush, or until one of another group or direction comes: a round's sends to
        # every expert node progress together (one after another, a receive of one node's answer would hold up the
        # send to the next), its receives too. Never a send and a receive in one batch: the peer posts them apart,
        # and NCCL leaves groups that differ across the two ends undefined (NVIDIA/nccl#1279, #2130); on 2 x H200
        # the first round hung.
        self._batch: list = []
        self._batch_group = None
        self._batch_op = None
        self._batch_works: list = []

    def _post(self, microbatch: int, op, message: torch.Tensor, peer: int) -> list:
        attention_node = peer if peer < self.attention_nodes else self.rank  # every link has one attention end
        group = self.groups[(attention_node, microbatch)]
        if self._batch and (group is not self._batch_group or op is not self._batch_op):
            self.flush()  # a batch is of one group, and sends or receives only
        self._batch_group, self._batch_op = group, op
        if message.numel():
            self._batch.append(dist.P2POp(op, message, peer, group))
        return [self._batch_works]  # the batch's works, filled in by flush

    def flush(self) -> None:
        try:
            if self._batch:  # in place: _post handed this list of works out
                self._batch_works += dist.batch_isend_irecv(self._batch)
        except RuntimeError as exc:  # gloo: a peer that closed its connection can fail the post itself
            raise TransportError(f"{self.backend} link failed: {exc}") from None
        finally:
            self._batch, self._batch_works, self._batch_group, self._batch_op = [], [], None, None

    def send(self, microbatch: int, peer: int, tensors: Sequence[torch.Tensor]) -> list:
        """One point-to-point send per message: a message of several tensors is first packed (device copies) into
        the (peer, microbatch) send slot as the receiver's slot lays it out. One send and one receive a round per
        link, not one per tensor: fewer NCCL operations, and no two groups of different shapes for NCCL to pair up
        (a round's sends beside its answer's receive on one side, three receives on the other). The slot is free
        again by the microbatch's next send: each side waits for a round's works before the next round of the same
        microbatch (LockstepClient.gather; the expert node sends one tensor, unpacked)."""
        metas = [TensorMeta(t.dtype, tuple(t.shape)) for t in tensors]
        self._check(peer, microbatch, metas)
        if len(tensors) == 1 and tensors[0].is_contiguous():
            message = tensors[0]
        else:
            message = self._slot(self._send_slots, peer, microbatch)[:packed_offsets(metas)[1]]
            for view, tensor in zip(packed_views(message, metas), tensors):
                view.copy_(tensor)
        return self._post(microbatch, dist.isend, message, peer)

    def receive(self, microbatch: int, peer: int, metas: Sequence[TensorMeta]) -> tuple[list[torch.Tensor], list]:
        self._check(peer, microbatch, metas)
        message = self._slot(self._slots, peer, microbatch)[:packed_offsets(metas)[1]]
        return packed_views(message, metas), self._post(microbatch, dist.irecv, message, peer)

    def _slot(self, slots: dict, peer: int, microbatch: int) -> torch.Tensor:
        if (peer, microbatch) not in slots:
            slots[(peer, microbatch)] = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
        return slots[(peer, microbatch)]

    def _works(self, posted: list) -> list:
        """The works of the batches in `posted` (each batch once), after flushing the one being filled."""
        self.flush()
        batches = {id(batch): batch for batch in posted}
        return [work for batch in batches.values() for work in batch]

    def enqueue_wait(self, works: list) -> None:
        if self.backend != "nccl":
            raise NotImplementedError("gloo links wait on the host")
        for work in self._works(works):
            work.wait()

    async def wait(self, works: list) -> None:
        """NCCL: the current stream waits for the works (the host does not). gloo: the host waits, in a thread."""
        works = self._works(works)
        if not works:
            return
        if self.backend == "nccl":
            for work in works:
                work.wait()
            return
        timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            await asyncio.to_thread(lambda: [work.wait(timeout) for work in works])
        except RuntimeError as exc:  # gloo: a peer closed its connection, or the timeout passed
            raise TransportError(f"gloo link failed: {exc}") from None

    def release(self) -> None:
        """NCCL: aborting the communicators ends their pending kernels (receives from a dead peer included), so the
        streams behind them drain; the links are gone after it, as a lockstep node's are after any failure."""
        if self.backend == "nccl":
            close_links()

    def close(self) -> None:
        close_links()


ABORT_TIMEOUT_S = 10.0
_abandoned = False  # an abort that did not return: the world is left as it is


def close_links(timeout_s: float = ABORT_TIMEOUT_S) -> None:
    """Leaves the world. NCCL's communicators are aborted, not destroyed: destroying waits for their pending work,
    and a peer that stopped first or died leaves work that never completes (seen on 2 x H200: an attention node's
    close hung in ProcessGroupNCCL.shutdown after its expert node had stopped).

    Every communicator is aborted at once, each from a thread of its own. One at a time, an abort's device-wide sync
    waits for the kernels still pending on the communicators not yet aborted, which a dead peer never completes
    (seen on 2 x H200 with a group per microbatch; NVIDIA/nccl#1013, pytorch#119797; torch's own abort of the
    world wraps the aborts in an NCCL group, but ProcessGroupNCCL runs each in a thread of its own, outside it).
    The aborts are waited for timeout_s: a node whose links failed reports it and goes on (or exits) instead of
    hanging there."""
    global _abandoned
    if not dist.is_initialized() or _abandoned:
        return
    if dist.get_backend() != "nccl":
        dist.destroy_process_group()
        return
    aborting = [threading.Thread(target=group.abort, name=f"nccl-abort-{i}", daemon=True)
                for i, group in enumerate(_process_groups())]
    for thread in aborting:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in aborting:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in aborting):
        _abandoned = True
        log.error("aborting the NCCL communicators did not return within %.0f s: the links are abandoned", timeout_s)
        return
    dist.distributed_c10d._abort_process_group()  # the bookkeeping; the communicators are aborted already


def _process_groups() -> list:
    """The world and every group made from it."""
    return list(dist.distributed_c10d._world.pg_names)


def init_links(backend: str, init_address: str, attention_nodes: int, expert_nodes: int, rank: int,
               microbatches: int, device: str, connect_timeout_s: float, recv_timeout_s: float,
               slot_bytes: int = 64 << 20, linked: dict[int, list[int]] | None = None) -> DistLinks:
    """Joins the cluster's world (every node calls this once at start) and makes one group per microbatch.
    `linked`: the expert nodes each attention node reaches over this world (default: every one); the others are
    linked by other backends (m2n/mixed.py), though every node joins the world."""
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"torch.distributed links are nccl or gloo, not {backend!r}")
    # Bound to the device, NCCL sets up the whole world's communicator at once; in a mix, nodes linked by ipc may
    # share a GPU, which one communicator refuses: then only the groups' communicators are made, at their barriers.
    kwargs = {"device_id": torch.device(device)} if backend == "nccl" and linked is None else {}
    if backend == "nccl":  # NVLink multicast (NVLS) can take shared GPUs out of service where it cannot be set up
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        dist.init_process_group(backend, init_method=init_address, world_size=attention_nodes + expert_nodes,
                                rank=rank, timeout=datetime.timedelta(seconds=connect_timeout_s), **kwargs)
    except (RuntimeError, ValueError) as exc:  # a store that never filled up, or a refused connection
        raise TransportError(f"rank {rank} could not join the {backend} world at {init_address}: {exc}") from None
    experts_of = {a: [attention_nodes + e for e in (range(expert_nodes) if linked is None else linked[a])]
                  for a in range(attention_nodes)}  # by rank
    groups = {}
    for a in range(attention_nodes):  # every rank creates every group, in the same order (torch's rule)
        if not experts_of[a]:
            continue
        for mb in range(microbatches):
            group = dist.new_group([a] + experts_of[a], backend=backend)
            if rank == a or rank in experts_of[a]:
                groups[(a, mb)] = group
    barrier = {"device_ids": [torch.device(device).index or 0]} if backend == "nccl" else {}
    for group in groups.values():  # communicators exist before the first round
        dist.barrier(group=group, **barrier)
    _connect_both_ways(groups, rank, experts_of, device)
    return DistLinks(backend, attention_nodes, rank, groups, microbatches, slot_bytes, device, recv_timeout_s)


def _connect_both_ways(groups: dict[tuple[int, int], object], rank: int, experts_of: dict[int, list[int]],
                       device: str) -> None:
    """One send and one receive each way on every link, in one batch per group, before the first round. NCCL
    connects a pair at its first batch; two first batches of different shapes (the attention node's sends and
    receives, the expert node's receives only) fail with "Message truncated" (seen on 2 x H200, NCCL 2.28)."""
    for (a, _), group in sorted(groups.items()):  # every rank in the same order: no pair waits on another's turn
        ops = []
        for peer in (experts_of[a] if rank == a else [a]):
            ops += [dist.P2POp(dist.isend, torch.zeros(1, device=device), peer, group),
                    dist.P2POp(dist.irecv, torch.empty(1, device=device), peer, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def join_cluster(config: "Config", rank: int, device: str, slot_bytes: int) -> DistLinks:
    """init_links for the node of `rank` in the cluster `config` describes."""
    from ..config import ConfigError
    cluster, backend = config.cluster, config.transport.backend
    if not cluster.dist_address:
        raise ConfigError(f"transport.backend={backend} needs cluster.dist_address (the launcher sets one)")
    if backend == "nccl" and not cluster.ray_address:  # on Ray, each node's bundle holds a GPU of its own
        devices = ([config.node_device("attention", i) for i in range(cluster.attention_nodes)]
                   + [config.node_device("expert", i) for i in range(cluster.expert_nodes)])
        shared = sorted({d for d in devices if devices.count(d) > 1})
        if shared:
            raise ConfigError(f"transport.backend=nccl links one GPU per node, but nodes share {shared}: give each "
                              f"node its own GPU (cluster.attention_gpus, cluster.expert_gpus) or use ipc")
    return init_links(backend, cluster.dist_address, cluster.attention_nodes, cluster.expert_nodes, rank,
                      config.engine.microbatches, device, config.transport.connect_timeout_s,
                      config.transport.recv_timeout_s, slot_bytes)
