"""The lockstep M2N in `expertmesh bench transport`'s M2N rows: the serving classes themselves over their links
(gloo on cpu; on cuda NCCL with a GPU per process, else CUDA IPC, e.g. every process on one GPU under MPS; UCX
when named: lockstep-ucx). Senders are attention ranks running LockstepClient (m2n/lockstep.py), receivers expert
ranks running LockstepRounds (expert_node/lockstep.py) whose compute echoes the tokens back: a partial sum of an
expert node's size, no compute (as the other backends' m2n receiver answers).

Each token count is one step whose MoE layers are its rounds, WARMUP untimed ones first: the step plan crosses the
control connection once, before the timing, as in serving, where one plan covers every MoE layer of a step. The
timed rounds run in chunks of CHUNK with one wait per chunk: a round's figure is its chunk's time over CHUNK. Each
round still waits, on the device, for the previous round's answers (one stream), so the figure is a round's
latency. On ipc links both sides replay captured CUDA graphs (a chunk on the sender, the whole step on the
receiver), as serving's decode steps do, so no host is in it; on nccl, gloo and ucx the rounds are enqueued from
Python."""
from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any, Callable

import torch

from ..expert_node.lockstep import LockstepRounds
from ..launcher.local import free_port
from ..m2n.dist import init_links
from ..m2n.ipc import IpcLinks
from ..m2n.links import Links, slot_bytes_for
from ..m2n.lockstep import LockstepClient
from ..placement.plan import Placement
from ..transport.base import TransportError, connect_within
from ..transport.protocol import Hello, HelloReply, StepPlan, TensorMeta
from ..transport.ucx_context import import_ucxx
from ..transport.zmq import ZmqTransport
from .harness import (CONNECT_TIMEOUT_S, STALL_TIMEOUT_S, TOP_K, WARMUP, BenchError, M2nPlan, P2pPlan, Row,
                      SenderTiming, device_of, gpu_count, m2n_plan, m2n_rows, nccl_without_multicast, p2p_plan,
                      run_processes, sync, wait_barrier)

LOCKSTEP = "lockstep"  # the links the device allows (links_backend); lockstep-gloo, -nccl, -ipc, -ucx name them
LINKS = ("gloo", "nccl", "ipc", "ipc-sm", "ucx")  # ipc-sm: ipc links whose sends are one SM kernel (ipc_copy.py)
BACKENDS = (LOCKSTEP, *(f"{LOCKSTEP}-{links}" for links in LINKS))
_EXPERTS = 8  # per layer, in contiguous blocks over the receivers
CHUNK = 10  # timed rounds per wait on the device


def _placement(receivers: int, plan: M2nPlan) -> Placement:
    """Every layer a step of the plan can reach holds the same experts (layer ids only order the rounds)."""
    row = [[e * receivers // _EXPERTS] for e in range(_EXPERTS)]
    return Placement(receivers, {layer: row for layer in range(WARMUP + max(_timed(rounds) for _, rounds in plan))})


def _timed(rounds: int) -> int:
    """The plan's timed rounds, rounded up to whole chunks."""
    return -(-rounds // CHUNK) * CHUNK


def links_backend(device: str, processes: int, backend: str = LOCKSTEP) -> str:
    """The links of a lockstep backend: as named (lockstep-ipc), else gloo on cpu and, on cuda, NCCL when every
    process has a GPU of its own, else CUDA IPC."""
    named = backend.partition("-")[2]
    if named:
        return named
    if not device.startswith("cuda"):
        return "gloo"
    return "nccl" if gpu_count() >= processes else "ipc"


def check_links(backend: str, device: str, processes: int) -> None:
    """Refuses links that cannot join these processes on this device, before any process starts."""
    links = links_backend(device, processes, backend)
    if links == "gloo" and device != "cpu":
        raise BenchError(f"{backend}: gloo links carry CPU tensors; use --device cpu, or lockstep-nccl/-ipc")
    if links in ("nccl", "ipc", "ipc-sm") and device != "cuda":
        raise BenchError(f"{backend}: {links} links connect GPUs; add --device cuda")
    if links == "nccl" and gpu_count() < processes:
        raise BenchError(f"{backend}: NCCL needs a GPU per process ({processes}); this host has {gpu_count()}")
    if links == "ucx":
        try:
            import_ucxx()
        except TransportError as exc:
            raise BenchError(f"{backend}: {exc}") from None


def _join(device: str, rank: int, senders: int, receivers: int, dist_address: str, slot_bytes: int,
          backend: str, ucx_progress_mode: str) -> Links:
    backend = links_backend(device, senders + receivers, backend)
    # one microbatch: a step's rounds follow each other on one group, as the timing wants them
    peers = list(range(senders, senders + receivers)) if rank < senders else list(range(senders))
    if backend in ("ipc", "ipc-sm"):
        return IpcLinks(senders, rank, peers, 1, slot_bytes, device, STALL_TIMEOUT_S,
                        "sm" if backend == "ipc-sm" else "engine")
    if backend == "ucx":  # imported here: the forkserver that the processes fork from holds no UCX state
        from ..m2n.ucx_links import UcxLinks
        return UcxLinks(senders, rank, peers, 1, slot_bytes, device, STALL_TIMEOUT_S, ucx_progress_mode)
    if backend == "nccl":
        nccl_without_multicast()
    return init_links(backend, dist_address, senders, receivers, rank, 1, device, CONNECT_TIMEOUT_S,
                      STALL_TIMEOUT_S, slot_bytes)


def _echo(lane: int, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The round's tokens as its partial sums. They lie in a receive slot, which the round after next receives into
    again: on NCCL after this send (one group, one stream); on gloo only once the sender, having these answers,
    sent that round."""
    return hidden


async def _serve_until(done: Any, *coroutines: Any) -> None:
    """Runs the serving coroutines until every sender has its answers; the first failure ends the process at once
    (harness.wait_done would keep it waiting in a thread)."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        while not done.is_set():
            for task in tasks:
                if task.done():
                    task.result()  # they end only by failing
            await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()


def _slot_bytes(plan: M2nPlan, hidden: int, dtype: str) -> int:
    return slot_bytes_for(max(tokens for tokens, _ in plan), hidden, getattr(torch, dtype), TOP_K)


async def _lockstep_receiver(device: str, dist_address: str, address: str, receiver: int, senders: int,
                             receivers: int, plan: M2nPlan, hidden: int, dtype: str, backend: str,
                             ucx_progress_mode: str, report: Callable, done: Any, barrier: Any) -> None:
    listener = await ZmqTransport().listen(address)  # before joining: the senders connect once everyone joined
    links = _join(device, senders + receiver, senders, receivers, dist_address, _slot_bytes(plan, hidden, dtype),
                  backend, ucx_progress_mode)
    placement = _placement(receivers, plan)
    # one LockstepRounds per token count (= step): its MoE layers are the step's rounds, its capacity the tokens
    # on ipc links each step is captured whole and replayed, as serving's decode steps are
    graphed = links.backend == "ipc"
    steps = [LockstepRounds(links, list(range(WARMUP + _timed(rounds))), tokens, hidden, TOP_K, getattr(torch, dtype),
                            device, _echo, STALL_TIMEOUT_S, _echo if graphed else None, tokens)
             for tokens, rounds in plan]

    async def control() -> None:  # ExpertNode._receive, less its Dispatch path
        while True:
            peer, message = await listener.recv()
            if isinstance(message, Hello):
                held = [layer * message.num_experts + e for layer, e in placement.pairs_on(receiver)]
                rank = links.attention_rank(message.attention_node)
                links.attach(rank, message.region)
                await listener.send(peer, HelloReply(receiver, held, links.region_handle(rank)))
            elif isinstance(message, StepPlan):
                steps[message.step].add(message)
            else:
                raise BenchError(f"unexpected {type(message).__name__} on the control connection")

    async def failed(attention_node: int, step_plan: StepPlan, layer: int, microbatch: int, exc: Exception) -> None:
        raise exc  # the echo cannot fail; if it does, so does the measurement

    try:
        await _serve_until(done, control(), *(step.serve(failed) for step in steps))
    finally:
        await listener.close()
        links.close()


async def _lockstep_sender(device: str, dist_address: str, addresses: list[str], sender: int, senders: int,
                           receivers: int, plan: M2nPlan, hidden: int, dtype: str, backend: str,
                           ucx_progress_mode: str, report: Callable, done: Any, barrier: Any) -> None:
    links = _join(device, sender, senders, receivers, dist_address, _slot_bytes(plan, hidden, dtype), backend,
                  ucx_progress_mode)
    connections = [await connect_within(ZmqTransport(), address, CONNECT_TIMEOUT_S) for address in addresses]
    placement = _placement(receivers, plan)
    client = LockstepClient(connections, links, placement, sender, max(tokens for tokens, _ in plan), hidden,
                            getattr(torch, dtype), 1, device, STALL_TIMEOUT_S)

    def moved() -> int:
        return sum(client.stats.bytes_sent) + sum(client.stats.bytes_received)

    try:
        await client.handshake(len(placement.nodes_of), _EXPERTS, CONNECT_TIMEOUT_S)
        for step, (tokens, rounds) in enumerate(plan):
            states = torch.ones(tokens, hidden, dtype=getattr(torch, dtype), device=device)
            # experts spread over the receivers: each receiver's ids are masked differently, as in serving
            ids = (torch.arange(tokens * TOP_K, dtype=torch.int32, device=device) % _EXPERTS).view(tokens, TOP_K)
            weights = torch.full((tokens, TOP_K), 1 / TOP_K, dtype=torch.float32, device=device)
            await client.begin_step(step, [tokens])
            rounds = _timed(rounds)
            before = moved()  # the client's stats count every step's eager rounds
            for layer in range(WARMUP):
                handle = await client.dispatch(step, layer, 0, states, ids, weights)
                client.reduce(handle, await client.gather(handle), states)
                sync(device)
            chunk = _chunk_graph(client, states, ids, weights) if client.captures_steps else None
            per_round = (moved() - before) // WARMUP  # bytes; replays do not count in the client's stats
            await wait_barrier(barrier)  # every sender starts timing together: the bandwidth is of concurrent traffic
            sync(device)
            first, round_s = time.perf_counter(), []
            for layer in range(WARMUP, WARMUP + rounds, CHUNK):
                start = time.perf_counter()
                if chunk is not None:
                    chunk.replay()
                else:
                    for i in range(CHUNK):
                        handle = await client.dispatch(step, layer + i, 0, states, ids, weights)
                        client.reduce(handle, await client.gather(handle), states)
                sync(device)  # the chunk ends when its last summed answers are on the device
                round_s += [(time.perf_counter() - start) / CHUNK] * CHUNK
            elapsed_s = time.perf_counter() - first
            bytes_moved = per_round * rounds
            await client.end_step(step)  # an expert rank's failure surfaces here, before the timing counts
            report(("timing", SenderTiming(sender, tokens, states.nbytes, round_s, elapsed_s, bytes_moved)))
    finally:
        await client.close()  # and its links


def _chunk_graph(client: LockstepClient, states: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.cuda.CUDAGraph:
    """CHUNK rounds captured as one CUDA graph (ipc links keep their counts on the device): the host is off the
    rounds' path, as in a captured decode step."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CHUNK):
            client.enqueue_combine(client.enqueue_round(0, 0, states, ids, weights), states.dtype)
    return graph


def lockstep_m2n(device: str, senders: int, receivers: int, tokens: list[int], hidden: int, dtype: str,
                 iters: int, backend: str = LOCKSTEP, ucx_progress_mode: str = "thread") -> list[Row]:
    """M2N rounds of the lockstep M2N: every sender's tokens (with their ids and weights) to every receiver, each
    receiver's partial sums back, summed; attention rank i is sender i, expert rank senders + j receiver j. Rows are
    labelled lockstep-<links backend>."""
    plan = m2n_plan(tokens, hidden, dtype, receivers, iters)
    addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(receivers)]
    common = dict(dist_address=f"tcp://127.0.0.1:{free_port()}", senders=senders, receivers=receivers, plan=plan,
                  hidden=hidden, dtype=dtype, backend=backend, ucx_progress_mode=ucx_progress_mode)
    roles = [(_lockstep_sender, dict(common, device=device_of(i, device), addresses=addresses, sender=i))
             for i in range(senders)]
    roles += [(_lockstep_receiver, dict(common, device=device_of(senders + j, device), address=address, receiver=j))
              for j, address in enumerate(addresses)]
    label = f"{LOCKSTEP}-{links_backend(device, senders + receivers, backend)}"
    timings = run_processes(f"{label} m2n {senders}x{receivers}", roles, expected=senders * len(plan),
                            barrier_parties=senders)
    return m2n_rows(label, device, senders, receivers, timings)


# ---- point to point over the links --------------------------------------------------------------------------

async def _links_p2p(device: str, rank: int, dist_address: str, address: str, plan: P2pPlan, backend: str,
                     ucx_progress_mode: str, report: Callable, done: Any, barrier: Any) -> None:
    """Rank 0 (an attention node's links) sends each message to rank 1 (an expert node's), which sends it back
    from its receive slot; one receive slot each way, sized for the largest message. Each round trip is enqueued
    from Python and ends with a wait on the device, as NCCL's send/recv baseline does."""
    links = _join(device, rank, 1, 1, dist_address, max(size for size, _, _ in plan), backend, ucx_progress_mode)
    peer = 1 - rank
    # the receive regions' handles (ipc; ucx: worker addresses; empty on other links) cross over zmq, as in serving's
    # Hello; the sockets stay open to the end: zmq drops what a socket closed at once has not sent yet
    transport = ZmqTransport()
    if rank == 1:
        control = await transport.listen(address)
        sender, hello = await control.recv()
        links.attach(peer, hello.region)
        await control.send(sender, HelloReply(0, [], links.region_handle(peer)))
    else:
        control = await connect_within(transport, address, CONNECT_TIMEOUT_S)
        await control.send(Hello(0, 0, 0, links.region_handle(peer)))
        links.attach(peer, (await control.recv()).region)
    try:
        for message_bytes, round_trips, _ in plan:
            meta = [TensorMeta(torch.uint8, (message_bytes,))]
            message = torch.ones(message_bytes, dtype=torch.uint8, device=device)
            round_trip_s = []
            for i in range(WARMUP + round_trips):
                sync(device)
                start = time.perf_counter()
                if rank == 0:
                    sent = links.send(0, peer, [message])
                    views, works = links.receive(0, peer, meta)
                    links.flush()
                    await links.wait(works + sent)
                else:
                    views, works = links.receive(0, peer, meta)
                    links.flush()
                    await links.wait(works)
                    sent = links.send(0, peer, views)
                    links.flush()
                    await links.wait(sent)
                sync(device)
                if i >= WARMUP:
                    round_trip_s.append(time.perf_counter() - start)
            if rank == 0:
                one_way = statistics.median(round_trip_s) / 2
                label = f"{LOCKSTEP}-{links_backend(device, 2, backend)}"
                report(("row", Row("p2p", label, device.split(":")[0], "1x1",
                                   message_bytes, None, round_trips, one_way * 1e6, message_bytes / one_way / 1e9)))
        await wait_barrier(barrier)  # both sides are done before either closes
    finally:
        await control.close()
        links.close()


def links_point_to_point(backend: str, device: str, sizes: list[int], iters: int,
                         ucx_progress_mode: str = "thread") -> list[Row]:
    """One-way latency between two processes over the lockstep links (half the median round trip), and the
    bandwidth that implies: a link has one receive slot per microbatch, so it has no stream of messages in
    flight to time, unlike the other backends' p2p rows."""
    plan = p2p_plan(sizes, iters)
    common = dict(dist_address=f"tcp://127.0.0.1:{free_port()}", address=f"tcp://127.0.0.1:{free_port()}",
                  plan=plan, backend=backend, ucx_progress_mode=ucx_progress_mode)
    roles = [(_links_p2p, dict(common, device=device_of(rank, device), rank=rank)) for rank in range(2)]
    return run_processes(f"{backend} p2p", roles, expected=len(plan), barrier_parties=2)
