"""Point-to-point links over torch.distributed: NCCL between GPUs, gloo between CPU processes.

Every node of the cluster is one rank of one world: attention node a is rank a, expert node e is rank
attention_nodes + e. Each microbatch gets a process group of its own, so on NCCL its sends and receives queue
on a stream of their own: one microbatch waiting for its answer never holds up another's dispatch (ping-pong).
Sends and receives are stream-ordered on NCCL (the host never waits for them); gloo's are waited on in a
thread, so that the event loop keeps serving."""
from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..transport.base import TransportError

if TYPE_CHECKING:
    from ..config import Config

Pairs = list[tuple[torch.Tensor, int]]  # (tensor, peer rank)


@dataclass
class DistLinks:
    backend: str  # "nccl" or "gloo"
    attention_nodes: int
    groups: list  # one process group per microbatch
    timeout_s: float  # gloo waits raise after this; NCCL's are bounded by the caller (lockstep.wait_event)

    def attention_rank(self, node: int) -> int:
        return node

    def expert_rank(self, node: int) -> int:
        return self.attention_nodes + node

    def post(self, microbatch: int, sends: Pairs, recvs: Pairs) -> list:
        """Starts the sends and receives of one round of `microbatch` as one group; returns their works."""
        group = self.groups[microbatch % len(self.groups)]
        ops = ([dist.P2POp(dist.isend, t, peer, group) for t, peer in sends if t.numel()]
               + [dist.P2POp(dist.irecv, t, peer, group) for t, peer in recvs if t.numel()])
        return dist.batch_isend_irecv(ops) if ops else []

    async def wait(self, works: list) -> None:
        """NCCL: the current stream waits for the works (the host does not). gloo: the host waits, in a thread."""
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


def init_links(backend: str, init_address: str, attention_nodes: int, expert_nodes: int, rank: int,
               microbatches: int, device: str, connect_timeout_s: float, recv_timeout_s: float) -> DistLinks:
    """Joins the cluster's world (every node calls this once at start) and makes one group per microbatch."""
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"torch.distributed links are nccl or gloo, not {backend!r}")
    kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
    try:
        dist.init_process_group(backend, init_method=init_address, world_size=attention_nodes + expert_nodes,
                                rank=rank, timeout=datetime.timedelta(seconds=connect_timeout_s), **kwargs)
    except (RuntimeError, ValueError) as exc:  # a store that never filled up, or a refused connection
        raise TransportError(f"rank {rank} could not join the {backend} world at {init_address}: {exc}") from None
    groups = [dist.group.WORLD] + [dist.new_group(backend=backend) for _ in range(1, microbatches)]
    for group in groups:  # communicators exist before the first round, on every rank at once
        dist.barrier(group=group, **({"device_ids": [torch.device(device).index or 0]} if backend == "nccl" else {}))
    return DistLinks(backend, attention_nodes, groups, recv_timeout_s)


def close_links() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def join_cluster(config: "Config", role: str, index: int, device: str) -> DistLinks:
    """init_links for node `index` of `role` ("attention" or "expert") of the cluster `config` describes."""
    from ..config import ConfigError
    cluster, backend = config.cluster, config.transport.backend
    if not cluster.dist_address:
        raise ConfigError(f"transport.backend={backend} needs cluster.dist_address (the launcher sets one)")
    if backend == "nccl":
        devices = ([config.node_device("attention", i) for i in range(cluster.attention_nodes)]
                   + [config.node_device("expert", i) for i in range(cluster.expert_nodes)])
        shared = sorted({d for d in devices if devices.count(d) > 1})
        if shared:
            raise ConfigError(f"transport.backend=nccl links one GPU per node, but nodes share {shared}: give each "
                              f"node its own GPU (cluster.attention_gpus, cluster.expert_gpus) or use ucx")
    rank = index if role == "attention" else cluster.attention_nodes + index
    return init_links(backend, cluster.dist_address, cluster.attention_nodes, cluster.expert_nodes, rank,
                      config.engine.microbatches, device, config.transport.connect_timeout_s,
                      config.transport.recv_timeout_s)
