"""The baselines `expertmesh bench transport` compares our transports with: torch.distributed (NCCL send/recv and
all_to_all_single; gloo on CPU, for tests) and raw ucxx, the floor of any UCX-based transport written in Python."""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable, Iterator

import torch

from ..launcher.local import free_port
from .harness import (CONNECT_TIMEOUT_S, WARMUP, P2pPlan, M2nPlan, Row, SenderTiming, device_of, m2n_plan,
                      m2n_rows, nccl_without_multicast, p2p_plan, p2p_row, run_processes, sync, time_p2p,
                      wait_barrier, wait_done)


# ---- torch.distributed --------------------------------------------------------------------------------------

def _init_process_group(dist_backend: str, port: int, rank: int, world_size: int) -> None:
    import torch.distributed as dist
    nccl_without_multicast()
    dist.init_process_group(dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def _collective_p2p(dist_backend: str, device: str, port: int, rank: int, plan: P2pPlan,
                    report: Callable, done: Any, barrier: Any) -> None:
    """NCCL send/recv between ranks 0 and 1, the same ping-pong and stream as the transports'."""
    import torch.distributed as dist
    _init_process_group(dist_backend, port, rank, 2)
    peer = 1 - rank
    try:
        ack = torch.zeros(1, dtype=torch.uint8, device=device)
        for message_bytes, round_trips, stream in plan:
            buffer = torch.ones(message_bytes, dtype=torch.uint8, device=device)
            round_trip_s = []
            for i in range(WARMUP + round_trips):
                sync(device)
                start = time.perf_counter()
                if rank == 0:
                    dist.send(buffer, peer)
                    dist.recv(buffer, peer)
                else:
                    dist.recv(buffer, peer)
                    dist.send(buffer, peer)
                sync(device)  # NCCL calls return once queued on the GPU: the time is the GPU's
                if i >= WARMUP:
                    round_trip_s.append(time.perf_counter() - start)
            sync(device)
            start = time.perf_counter()
            for _ in range(stream):
                (dist.send if rank == 0 else dist.recv)(buffer, peer)
            (dist.recv if rank == 0 else dist.send)(ack, peer)
            sync(device)
            stream_s = time.perf_counter() - start
            if rank == 0:
                report(("row", p2p_row(dist_backend, device, message_bytes, round_trip_s, stream, stream_s)))
    finally:
        dist.destroy_process_group()


def _collective_m2n(dist_backend: str, device: str, port: int, rank: int, senders: int, receivers: int,
                    plan: M2nPlan, hidden: int, dtype: str, report: Callable, done: Any, barrier: Any) -> None:
    """The M2N round as two all_to_all_single calls over senders + receivers ranks: the senders' rows go to every
    receiver (dispatch), the receivers' rows come back (combine); nothing moves between two senders or two receivers."""
    import torch.distributed as dist
    world_size = senders + receivers
    _init_process_group(dist_backend, port, rank, world_size)
    is_sender = rank < senders
    try:
        for tokens, rounds in plan:
            to_receivers = [0] * senders + [tokens] * receivers  # rows a sender sends (dispatch) or gets (combine)
            to_senders = [tokens] * senders + [0] * receivers
            nothing = [0] * world_size
            dispatch_in, dispatch_out = (to_receivers, nothing) if is_sender else (nothing, to_senders)
            combine_in, combine_out = (nothing, to_receivers) if is_sender else (to_senders, nothing)
            dtype_ = getattr(torch, dtype)

            def rows(splits: list[int]) -> torch.Tensor:
                return torch.ones(sum(splits), hidden, dtype=dtype_, device=device)

            send, received, answer, answers = rows(dispatch_in), rows(dispatch_out), rows(combine_in), rows(combine_out)
            round_s = []
            for i in range(WARMUP + rounds):
                sync(device)
                if i == WARMUP:
                    first = time.perf_counter()
                start = time.perf_counter()
                dist.all_to_all_single(received, send, dispatch_out, dispatch_in)
                dist.all_to_all_single(answers, answer, combine_out, combine_in)
                sync(device)
                if i >= WARMUP:
                    round_s.append(time.perf_counter() - start)
            elapsed_s = time.perf_counter() - first
            message_bytes = tokens * hidden * dtype_.itemsize
            if is_sender:
                report(("timing", SenderTiming(rank, tokens, message_bytes, round_s, elapsed_s,
                                               rounds * receivers * 2 * message_bytes)))
    finally:
        dist.destroy_process_group()


def collective_point_to_point(sizes: list[int], iters: int, dist_backend: str = "nccl") -> list[Row]:
    """torch.distributed send/recv between two processes (NCCL on GPUs 0 and 1; gloo on CPU, for tests)."""
    device = "cuda" if dist_backend == "nccl" else "cpu"
    plan, port = p2p_plan(sizes, iters), free_port()
    roles = [(_collective_p2p, dict(dist_backend=dist_backend, device=device_of(rank, device), port=port,
                                    rank=rank, plan=plan)) for rank in range(2)]
    return run_processes(f"{dist_backend} p2p", roles, expected=len(plan))


def collective_m2n(senders: int, receivers: int, tokens: list[int], hidden: int, dtype: str, iters: int,
                   dist_backend: str = "nccl") -> list[Row]:
    """The M2N round as all_to_all_single over senders + receivers ranks, one GPU each for NCCL."""
    device = "cuda" if dist_backend == "nccl" else "cpu"
    plan, port = m2n_plan(tokens, hidden, dtype, receivers, iters), free_port()
    roles = [(_collective_m2n, dict(dist_backend=dist_backend, device=device_of(rank, device), port=port,
                                    rank=rank, senders=senders, receivers=receivers, plan=plan, hidden=hidden,
                                    dtype=dtype)) for rank in range(senders + receivers)]
    timings = run_processes(f"{dist_backend} m2n {senders}x{receivers}", roles, expected=senders * len(plan))
    return m2n_rows(dist_backend, device, senders, receivers, timings)


# ---- raw ucxx -----------------------------------------------------------------------------------------------

RAW_UCXX = "ucxx-raw"


@contextlib.contextmanager
def _ucxx_started(device: str, progress_mode: str) -> Iterator[Any]:
    """ucxx's module-level context, with our ucx backend's UCX options and progress (see transport/ucx_context)."""
    from ..transport.ucx_context import import_ucxx, ucx_options
    import_ucxx()
    import ucxx
    threaded = progress_mode == "thread"
    ucxx.init(options=ucx_options(torch.device(device), None), progress_mode=progress_mode,
              enable_python_future=threaded, enable_delayed_submission=threaded)
    try:
        yield ucxx
    finally:
        ucxx.stop_notifier_thread()  # not a daemon: the process would not exit, even after a failure


def _buffer(nbytes: int, device: str) -> Any:
    """Host memory as numpy (ucxx's buffer protocol path), GPU memory as a torch tensor (its CUDA array interface)."""
    if device == "cpu":
        import numpy
        return numpy.ones(nbytes, dtype=numpy.uint8)
    return torch.ones(nbytes, dtype=torch.uint8, device=device)


async def _ucxx_server(device: str, port: int, plan: P2pPlan, ucx_progress_mode: str,
                       report: Callable, done: Any, barrier: Any) -> None:
    """Echoes each round trip's message into the same buffer, then takes the stream and acks it with one byte."""
    accepted = asyncio.get_running_loop().create_future()

    async def accept(endpoint: Any) -> None:  # hands the endpoint over: the listener's handler ends at once
        accepted.set_result(endpoint)

    with _ucxx_started(device, ucx_progress_mode) as ucxx:
        listener = ucxx.create_listener(accept, port)
        await wait_barrier(barrier)  # the client connects once the listener is up
        endpoint = await accepted
        try:
            ack = _buffer(1, device)
            for message_bytes, round_trips, stream in plan:
                buffer = _buffer(message_bytes, device)
                sync(device)
                for _ in range(WARMUP + round_trips):
                    await endpoint.recv(buffer)
                    await endpoint.send(buffer)
                for _ in range(stream):
                    await endpoint.recv(buffer)
                await endpoint.send(ack)
            await wait_done(done)
        finally:
            await endpoint.close()
            listener.close()


async def _ucxx_client(device: str, port: int, plan: P2pPlan, ucx_progress_mode: str,
                       report: Callable, done: Any, barrier: Any) -> None:
    with _ucxx_started(device, ucx_progress_mode) as ucxx:
        await wait_barrier(barrier)
        endpoint = await asyncio.wait_for(ucxx.create_endpoint("127.0.0.1", port), CONNECT_TIMEOUT_S)
        try:
            ack = _buffer(1, device)
            for message_bytes, round_trips, stream in plan:
                buffer = _buffer(message_bytes, device)
                sync(device)
                round_trip_s, stream_s = await time_p2p(device, round_trips, stream, lambda: endpoint.send(buffer),
                                                        lambda: endpoint.recv(buffer), lambda: endpoint.recv(ack))
                report(("row", p2p_row(RAW_UCXX, device, message_bytes, round_trip_s, stream, stream_s)))
        finally:
            await endpoint.close()


def raw_ucxx_point_to_point(device: str, sizes: list[int], iters: int, ucx_progress_mode: str = "thread") -> list[Row]:
    """ucxx's own endpoint send/recv of buffers allocated before timing, no framing and no headers: what any
    UCX-based transport from Python can at best do, measured as our transports' point to point."""
    plan, port = p2p_plan(sizes, iters), free_port()
    roles = [(role, dict(device=device_of(slot, device), port=port, plan=plan, ucx_progress_mode=ucx_progress_mode))
             for slot, role in enumerate([_ucxx_client, _ucxx_server])]
    return run_processes(f"{RAW_UCXX} p2p", roles, expected=len(plan), barrier_parties=2)
