"""`expertmesh bench transport`: latency and bandwidth of our transports between separate processes, point to
point and in a MoE layer's M2N pattern (dispatch to N receivers, N answers back), beside the baselines."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..launcher.local import free_port
from .baselines import RAW_UCXX, collective_m2n, collective_point_to_point, raw_ucxx_point_to_point
from .harness import (CONNECT_TIMEOUT_S, STALL_TIMEOUT_S, TOP_K, WARMUP, BenchError, M2nPlan, P2pPlan, Row,
                      SenderTiming, device_of, format_size, gpu_count, m2n_plan, m2n_rows, p2p_plan, p2p_row,
                      parse_sizes, run_processes, sync, time_p2p, wait_barrier, wait_done)
from .lockstep_m2n import BACKENDS as LOCKSTEP_BACKENDS, LOCKSTEP, check_links, links_point_to_point, lockstep_m2n

DEFAULT_BACKENDS = ("zmq", "ucx")
BACKENDS = (*DEFAULT_BACKENDS, *LOCKSTEP_BACKENDS)
CPU_SIZES = "4K,64K,1M,16M,64M"
CUDA_SIZES = CPU_SIZES + ",256M"


@dataclass
class BenchConfig:
    backends: list[str] = field(default_factory=lambda: list(DEFAULT_BACKENDS))
    device: str = "cpu"
    sizes: list[int] = field(default_factory=lambda: parse_sizes(CPU_SIZES))
    iters: int = 100  # timed round trips (p2p) or rounds (m2n) of small messages; large ones get fewer
    senders: int = 2
    receivers: int = 2
    tokens: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    hidden: int = 4096
    dtype: str = "bfloat16"
    nccl: bool = False
    ucx_progress_mode: str = "thread"  # who progresses UCX in the ucx processes: thread or polling
    raw_ucxx: bool = True  # with ucx among the backends, also the raw ucxx baseline


def _address(backend: str) -> str:
    return f"{'ucx' if backend == 'ucx' else 'tcp'}://127.0.0.1:{free_port()}"


# ---- the benchmark processes --------------------------------------------------------------------------------

async def _listener_recv(listener: Any) -> tuple[Any, Any]:
    try:
        return await asyncio.wait_for(listener.recv(), STALL_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise BenchError(f"no message within {STALL_TIMEOUT_S} s: the peer is gone") from None


async def _p2p_server(backend: str, device: str, address: str, plan: P2pPlan,
                      report: Callable, done: Any, barrier: Any, ucx_progress_mode: str = "thread") -> None:
    from ..transport.base import make_transport
    from ..transport.protocol import Combine
    listener = await make_transport(backend, device, ucx_progress_mode).listen(address)
    ack = Combine(0, 0, 0, torch.zeros(1, dtype=torch.uint8, device=device))
    try:
        for _, round_trips, stream in plan:
            for _ in range(WARMUP + round_trips):
                peer, message = await _listener_recv(listener)
                await listener.send(peer, message)
            for _ in range(stream):
                peer, message = await _listener_recv(listener)
            await listener.send(peer, ack)
        await wait_done(done)
    finally:
        await listener.close()


async def _p2p_client(backend: str, device: str, address: str, plan: P2pPlan,
                      report: Callable, done: Any, barrier: Any, ucx_progress_mode: str = "thread") -> None:
    from ..transport.base import connect_within, make_transport
    from ..transport.protocol import Combine
    connection = await connect_within(make_transport(backend, device, ucx_progress_mode), address,
                                      CONNECT_TIMEOUT_S)
    try:
        for message_bytes, round_trips, stream in plan:
            message = Combine(0, 0, 0, torch.ones(message_bytes, dtype=torch.uint8, device=device))
            round_trip_s, stream_s = await time_p2p(device, round_trips, stream, lambda: connection.send(message),
                                                    lambda: connection.recv(STALL_TIMEOUT_S))
            report(("row", p2p_row(backend, device, message_bytes, round_trip_s, stream, stream_s)))
    finally:
        await connection.close()


async def _m2n_receiver(backend: str, device: str, address: str, senders: int, plan: M2nPlan,
                        report: Callable, done: Any, barrier: Any, ucx_progress_mode: str = "thread") -> None:
    from ..transport.base import make_transport
    from ..transport.protocol import Combine
    listener = await make_transport(backend, device, ucx_progress_mode).listen(address)
    try:
        for _, rounds in plan:
            for _ in range(senders * (WARMUP + rounds)):
                peer, dispatch = await _listener_recv(listener)
                # The hidden states come back as the "partial sum": same size as an expert node's, no compute.
                await listener.send(peer, Combine(dispatch.step, dispatch.layer, dispatch.microbatch, dispatch.hidden))
                listener.recycle(dispatch)  # sent: its memory may take the next dispatch, as on an expert node
        await wait_done(done)
    finally:
        await listener.close()


async def _m2n_sender(backend: str, device: str, sender: int, addresses: list[str], plan: M2nPlan,
                      hidden: int, dtype: str, report: Callable, done: Any, barrier: Any,
                      ucx_progress_mode: str = "thread") -> None:
    from ..transport.base import connect_within, make_transport
    from ..transport.protocol import Dispatch, TensorMeta, packed_offsets, packed_views
    transport = make_transport(backend, device, ucx_progress_mode)
    connections = [await connect_within(transport, address, CONNECT_TIMEOUT_S) for address in addresses]
    try:
        for tokens, rounds in plan:
            # carved from one buffer, as M2NClient's send buffers are (a transport may send them as one frame)
            metas = [TensorMeta(getattr(torch, dtype), (tokens, hidden)), TensorMeta(torch.int32, (tokens, TOP_K)),
                     TensorMeta(torch.float32, (tokens, TOP_K))]
            flat = torch.empty(packed_offsets(metas)[1], dtype=torch.uint8, device=device)
            message = Dispatch(0, 0, 0, *packed_views(flat, metas))
            message.hidden.fill_(1)
            message.expert_ids.zero_()
            message.expert_weights.fill_(1 / TOP_K)
            round_s = []
            for i in range(WARMUP + rounds):
                if i == WARMUP:  # every sender starts timing together: the bandwidth is of concurrent traffic
                    await wait_barrier(barrier)
                    sync(device)
                    first = time.perf_counter()
                start = time.perf_counter()
                for connection in connections:
                    await connection.send(message)
                for connection in connections:
                    connection.recycle(await connection.recv(STALL_TIMEOUT_S))
                sync(device)
                if i >= WARMUP:
                    round_s.append(time.perf_counter() - start)
            elapsed_s = time.perf_counter() - first
            bytes_per_round = len(connections) * (sum(t.nbytes for t in message.tensors()) + message.hidden.nbytes)
            report(("timing", SenderTiming(sender, tokens, message.hidden.nbytes, round_s, elapsed_s,
                                           rounds * bytes_per_round)))
    finally:
        for connection in connections:
            await connection.close()


# ---- the parent ------------------------------------------------------------------------------------------

def point_to_point(backend: str, device: str, sizes: list[int], iters: int,
                   ucx_progress_mode: str = "thread") -> list[Row]:
    """One-way latency and stream bandwidth between two processes over `backend`'s real transport classes."""
    plan = p2p_plan(sizes, iters)
    address = _address(backend)
    roles = [(role, dict(backend=backend, device=device_of(slot, device), address=address, plan=plan,
                         ucx_progress_mode=ucx_progress_mode))
             for slot, role in enumerate([_p2p_client, _p2p_server])]
    return run_processes(f"{backend} p2p", roles, expected=len(plan))


def m2n(backend: str, device: str, senders: int, receivers: int, tokens: list[int], hidden: int, dtype: str,
        iters: int, ucx_progress_mode: str = "thread") -> list[Row]:
    """Rounds of one Dispatch from each sender to each receiver and a same-sized Combine back."""
    if backend in LOCKSTEP_BACKENDS:
        return lockstep_m2n(device, senders, receivers, tokens, hidden, dtype, iters, backend, ucx_progress_mode)
    plan = m2n_plan(tokens, hidden, dtype, receivers, iters)
    addresses = [_address(backend) for _ in range(receivers)]
    roles = [(_m2n_sender, dict(backend=backend, device=device_of(i, device), sender=i, addresses=addresses,
                                plan=plan, hidden=hidden, dtype=dtype, ucx_progress_mode=ucx_progress_mode))
             for i in range(senders)]
    roles += [(_m2n_receiver, dict(backend=backend, device=device_of(senders + j, device), address=address,
                                   senders=senders, plan=plan, ucx_progress_mode=ucx_progress_mode))
              for j, address in enumerate(addresses)]
    timings = run_processes(f"{backend} m2n {senders}x{receivers}", roles, expected=senders * len(plan),
                            barrier_parties=senders)
    return m2n_rows(backend, device, senders, receivers, timings)


def check(config: BenchConfig) -> list[str]:
    """Refuses what cannot run, before any process starts; returns notes on what will be left out."""
    from ..transport.base import make_transport
    if config.device not in ("cpu", "cuda"):
        raise BenchError(f"--device {config.device!r}: choose cpu or cuda")
    gpus = gpu_count()
    if config.device == "cuda" and gpus == 0:
        raise BenchError("--device cuda, but torch sees no CUDA GPU here")
    for backend in config.backends:
        if backend not in BACKENDS:
            raise BenchError(f"unknown backend {backend!r} in --backends; choose from {', '.join(BACKENDS)}")
        if backend in LOCKSTEP_BACKENDS:  # torch.distributed or CUDA IPC: no transport class to try
            _check_lockstep(config, gpus, backend)
            continue
        if backend == "zmq" and config.device == "cuda":
            raise BenchError("backend 'zmq' carries CPU tensors only (the serving path cannot use it on cuda); "
                             "use --backends ucx with --device cuda")
        # a missing ucxx, or an unknown --ucx-progress-mode, fails here
        make_transport(backend, config.device, config.ucx_progress_mode)
    if not config.sizes or min(config.sizes) < 1:
        raise BenchError(f"--sizes {config.sizes}: need at least one positive size")
    if config.senders < 1 or config.receivers < 1:
        raise BenchError(f"--m2n {config.senders}x{config.receivers}: need at least one sender and one receiver")
    if not config.tokens or min(config.tokens) < 1 or config.hidden < 1 or config.iters < 1:
        raise BenchError(f"--tokens {config.tokens}, --hidden {config.hidden}, --iters {config.iters}: "
                         "must be positive")
    notes = []
    if config.nccl:
        if config.device != "cuda":
            raise BenchError("--nccl compares with our transports on the same GPUs: add --device cuda")
        if gpus < 2:
            raise BenchError(f"--nccl needs 2 GPUs (NCCL refuses two ranks on one GPU); this host has {gpus}")
        if config.senders + config.receivers > gpus:
            notes.append(f"nccl m2n left out: {config.senders}x{config.receivers} needs "
                         f"{config.senders + config.receivers} GPUs (one rank each), this host has {gpus}")
    return notes


def _check_lockstep(config: BenchConfig, gpus: int, backend: str) -> None:
    check_links(backend, config.device, config.senders + config.receivers)
    if backend != LOCKSTEP:  # named: point-to-point rows too, between two processes
        check_links(backend, config.device, 2)
    elif config.device == "cuda" and config.senders + config.receivers > gpus:
        print(f"lockstep: {config.senders + config.receivers} processes on {gpus} GPU(s): CUDA IPC links (NCCL needs a "
              f"GPU per process); run CUDA MPS for the processes' kernels to run at once", file=sys.stderr)


def run(config: BenchConfig) -> tuple[list[Row], list[str]]:
    notes = check(config)
    for note in notes:
        print(note, file=sys.stderr)
    rows: list[Row] = []
    for backend in config.backends:
        if backend in DEFAULT_BACKENDS:
            rows += point_to_point(backend, config.device, config.sizes, config.iters, config.ucx_progress_mode)
        elif backend != LOCKSTEP:
            rows += links_point_to_point(backend, config.device, config.sizes, config.iters,
                                         config.ucx_progress_mode)
    if config.raw_ucxx and "ucx" in config.backends:
        rows += raw_ucxx_point_to_point(config.device, config.sizes, config.iters, config.ucx_progress_mode)
    if config.nccl:
        rows += collective_point_to_point(config.sizes, config.iters)
    for backend in config.backends:
        rows += m2n(backend, config.device, config.senders, config.receivers, config.tokens, config.hidden,
                    config.dtype, config.iters, config.ucx_progress_mode)
    if config.nccl and not notes:
        rows += collective_m2n(config.senders, config.receivers, config.tokens, config.hidden, config.dtype,
                               config.iters)
    if "ucx" in config.backends and config.ucx_progress_mode != "thread":
        notes = [*notes, f"ucx progress mode: {config.ucx_progress_mode} (each ucx process keeps a core busy)"]
    return rows, notes


def format_table(rows: list[Row], notes: list[str] = ()) -> str:
    header = ["pattern", "backend", "device", "procs", "size", "tokens", "iters", "latency_us", "GB/s"]
    cells = [[row.pattern, row.backend, row.device, row.processes, format_size(row.message_bytes),
              "-" if row.tokens is None else str(row.tokens), str(row.iters), f"{row.latency_us:.1f}",
              f"{row.bandwidth_gb_per_s:.3f}"] for row in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) if i < 4 else text.rjust(width) for i, (text, width)
                       in enumerate(zip(line, widths))) for line in [header, *cells]]
    lines += ["", "p2p: latency one way (half the median round trip of one message), GB/s of a one-way stream.",
              "m2n: size = tokens x hidden x dtype per sender and receiver; latency = median round (a Dispatch to",
              "each receiver, each receiver's Combine back); GB/s = all senders' bytes, both ways, over the slowest",
              "sender's time. GB = 1e9 bytes."]
    if any(row.backend == RAW_UCXX for row in rows):
        lines += [f"{RAW_UCXX}: ucxx's own send/recv of buffers allocated before timing, no framing or headers:",
                  "the floor of any UCX-based transport from Python."]
    if any(row.backend.startswith(LOCKSTEP) for row in rows):
        lines += [f"{LOCKSTEP}-* p2p (named links only): half the median round trip over the links; GB/s = size over",
                  "that one-way time (a link has one receive slot per microbatch: no stream of messages to time).",
                  f"{LOCKSTEP}-* m2n: the serving M2N over its links (gloo, nccl, ipc or ucx); a round is one MoE",
                  "layer of a step: dispatch (tokens, ids, weights to every receiver), gather, reduce. The step plan",
                  "(zmq) is sent before the timed rounds, one wait on the device per 10; each round waits on the",
                  "device for the previous one's answers. ipc: both sides replay captured CUDA graphs (no host in the",
                  "rounds); nccl, gloo, ucx: the rounds are enqueued from Python."]
    return "\n".join([*lines, *notes])


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    device = args.device
    senders, x, receivers = args.m2n.lower().partition("x")
    if not (x and senders.isdigit() and receivers.isdigit()):
        raise BenchError(f"--m2n {args.m2n!r}: expected SENDERSxRECEIVERS, e.g. 2x2")
    try:
        tokens = [int(part) for part in args.tokens.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"--tokens {args.tokens!r}: expected comma-separated token counts, e.g. 1,16,64") from None
    backends = args.backends or ("ucx" if device == "cuda" else ",".join(DEFAULT_BACKENDS))
    return BenchConfig([b.strip() for b in backends.split(",") if b.strip()], device,
                       parse_sizes(args.sizes or (CUDA_SIZES if device == "cuda" else CPU_SIZES)), args.iters,
                       int(senders), int(receivers), tokens, args.hidden, args.dtype, args.nccl,
                       getattr(args, "ucx_progress_mode", "thread"), getattr(args, "raw_ucxx", True))


def main(args: argparse.Namespace) -> int:
    """`expertmesh bench transport`: the table on stdout, progress on stderr, every row to --json."""
    from ..transport.base import TransportError
    started = time.perf_counter()
    try:
        config = config_from_args(args)
        rows, notes = run(config)
    except (BenchError, ValueError, TransportError) as exc:  # TransportError: ucxx is not installed
        print(f"expertmesh bench transport: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows, notes))
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": asdict(config), "notes": notes,
                                               "rows": [asdict(row) for row in rows]}, indent=1))
    return 0
