"""`expertmesh bench transport`: latency and bandwidth of the transports between separate processes, point to
point and in a MoE layer's M2N pattern (dispatch to N receivers, N answers back), beside NCCL on the same GPUs."""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..launcher.local import free_port

BACKENDS = ("zmq", "ucx")
CPU_SIZES = "4K,64K,1M,16M,64M"
CUDA_SIZES = CPU_SIZES + ",256M"
_TOP_K = 2  # experts per token in the Dispatch messages (Mixtral's): their ids and weights ride with the hidden states
_WARMUP = 3  # untimed round trips (rounds) per size: connections, allocators and UCX's registration caches settle
_MIN_ITERS = 5
_BYTES_PER_SIZE = 256 << 20  # what one size may move per measurement: fewer iterations for large messages
_STALL_TIMEOUT_S = 120.0  # no word from any benchmark process for this long: something hangs
_CONNECT_TIMEOUT_S = 30.0  # a listener may still be importing torch when its peers start


class BenchError(RuntimeError):
    """The benchmark cannot run as asked, or one of its processes failed."""


@dataclass
class BenchConfig:
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
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


@dataclass
class Row:
    pattern: str  # "p2p" or "m2n"
    backend: str  # "zmq", "ucx", "nccl" (or "gloo" in tests)
    device: str
    processes: str  # "1x1" point to point, else senders x receivers
    message_bytes: int  # p2p: the message; m2n: one sender's hidden states for one receiver
    tokens: int | None
    iters: int  # timed round trips (p2p) or rounds per sender (m2n)
    latency_us: float  # p2p: one way, half the median round trip; m2n: the median round
    bandwidth_gb_per_s: float  # GB = 1e9 bytes; p2p: a one-way stream; m2n: all links, both ways


@dataclass
class _SenderTiming:
    """One M2N sender's measurement of one token count; the parent merges the senders' into a Row."""
    sender: int
    tokens: int
    message_bytes: int
    round_s: list[float]
    elapsed_s: float
    bytes_moved: int


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = text.strip().upper().rstrip("B"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    if not number.isdigit() or int(number) < 1:
        raise ValueError(f"message size {text!r}: expected a positive number with an optional K, M or G suffix")
    return int(number) * units[unit]


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def format_size(nbytes: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def _iters_for(iters: int, nbytes: int) -> int:
    """`iters`, or as many as move _BYTES_PER_SIZE for large messages, but not fewer than _MIN_ITERS."""
    return max(min(iters, _MIN_ITERS), min(iters, _BYTES_PER_SIZE // max(1, nbytes)))


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device_of(slot: int, device: str) -> str:
    """Process `slot` of a measurement gets its own GPU while there are enough, then they wrap (as the launcher's)."""
    return "cpu" if device == "cpu" else f"cuda:{slot % max(1, gpu_count())}"


def _address(backend: str) -> str:
    return f"{'ucx' if backend == 'ucx' else 'tcp'}://127.0.0.1:{free_port()}"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ---- the benchmark processes --------------------------------------------------------------------------------

def _child_main(role: str, kwargs: dict[str, Any], results: Any, done: Any, barrier: Any) -> None:
    """Entry of every benchmark process: rows and timings go to `results`, a failure as ("error", text)."""
    torch.set_num_threads(1)  # several processes share the host's cores; nothing here computes
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # UCXX logs to stdout: keep the parent's stdout for the table
    device = kwargs.get("device", "cpu")
    report = results.put
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        target = _ROLES[role]
        if asyncio.iscoroutinefunction(target):
            import uvloop  # as in the serving processes
            uvloop.run(target(report=report, done=done, barrier=barrier, **kwargs))
        else:
            target(report=report, done=done, barrier=barrier, **kwargs)
    except BaseException as exc:
        report(("error", f"{role} on {device}: {exc!r}"))
        sys.exit(1)


async def _wait_done(done: Any) -> None:
    """Serving processes stay until every measuring one has its answers (a zmq socket closed at once drops
    what it has not sent yet)."""
    await asyncio.get_running_loop().run_in_executor(None, done.wait, _STALL_TIMEOUT_S)


async def _listener_recv(listener: Any) -> tuple[Any, Any]:
    try:
        return await asyncio.wait_for(listener.recv(), _STALL_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise BenchError(f"no message within {_STALL_TIMEOUT_S} s: the peer is gone") from None


async def _p2p_server(backend: str, device: str, address: str, plan: list[tuple[int, int, int]],
                      report: Callable, done: Any, barrier: Any, ucx_progress_mode: str = "thread") -> None:
    from ..transport.base import make_transport
    from ..transport.protocol import Combine
    listener = await make_transport(backend, device, ucx_progress_mode).listen(address)
    ack = Combine(0, 0, 0, torch.zeros(1, dtype=torch.uint8, device=device))
    try:
        for _, round_trips, stream in plan:
            for _ in range(_WARMUP + round_trips):
                peer, message = await _listener_recv(listener)
                await listener.send(peer, message)
            for _ in range(stream):
                peer, message = await _listener_recv(listener)
            await listener.send(peer, ack)
        await _wait_done(done)
    finally:
        await listener.close()


async def _p2p_client(backend: str, device: str, address: str, plan: list[tuple[int, int, int]],
                      report: Callable, done: Any, barrier: Any, ucx_progress_mode: str = "thread") -> None:
    from ..transport.base import connect_within, make_transport
    from ..transport.protocol import Combine
    connection = await connect_within(make_transport(backend, device, ucx_progress_mode), address,
                                      _CONNECT_TIMEOUT_S)
    try:
        for message_bytes, round_trips, stream in plan:
            message = Combine(0, 0, 0, torch.ones(message_bytes, dtype=torch.uint8, device=device))
            round_trip_s = []
            for i in range(_WARMUP + round_trips):
                _sync(device)
                start = time.perf_counter()
                await connection.send(message)
                await connection.recv(_STALL_TIMEOUT_S)
                _sync(device)
                if i >= _WARMUP:
                    round_trip_s.append(time.perf_counter() - start)
            _sync(device)
            start = time.perf_counter()
            for _ in range(stream):
                await connection.send(message)
            await connection.recv(_STALL_TIMEOUT_S)  # the ack: every message is in
            _sync(device)
            stream_s = time.perf_counter() - start
            report(("row", Row("p2p", backend, device.split(":")[0], "1x1", message_bytes, None, round_trips,
                               statistics.median(round_trip_s) / 2 * 1e6, stream * message_bytes / stream_s / 1e9)))
    finally:
        await connection.close()


async def _m2n_receiver(backend: str, device: str, address: str, senders: int, plan: list[tuple[int, int]],
                        report: Callable, done: Any, barrier: Any, ucx_progress_mode: str = "thread") -> None:
    from ..transport.base import make_transport
    from ..transport.protocol import Combine
    listener = await make_transport(backend, device, ucx_progress_mode).listen(address)
    try:
        for _, rounds in plan:
            for _ in range(senders * (_WARMUP + rounds)):
                peer, dispatch = await _listener_recv(listener)
                # The hidden states come back as the "partial sum": same size as an expert node's, no compute.
                await listener.send(peer, Combine(dispatch.step, dispatch.layer, dispatch.microbatch, dispatch.hidden))
        await _wait_done(done)
    finally:
        await listener.close()


async def _m2n_sender(backend: str, device: str, sender: int, addresses: list[str], plan: list[tuple[int, int]],
                      hidden: int, dtype: str, report: Callable, done: Any, barrier: Any,
                      ucx_progress_mode: str = "thread") -> None:
    from ..transport.base import connect_within, make_transport
    from ..transport.protocol import Dispatch
    transport = make_transport(backend, device, ucx_progress_mode)
    connections = [await connect_within(transport, address, _CONNECT_TIMEOUT_S) for address in addresses]
    loop = asyncio.get_running_loop()
    try:
        for tokens, rounds in plan:
            message = Dispatch(0, 0, 0, torch.ones(tokens, hidden, dtype=getattr(torch, dtype), device=device),
                               torch.zeros(tokens, _TOP_K, dtype=torch.int32, device=device),
                               torch.full((tokens, _TOP_K), 1 / _TOP_K, dtype=torch.float32, device=device))
            round_s = []
            for i in range(_WARMUP + rounds):
                if i == _WARMUP:  # every sender starts timing together: the bandwidth is of concurrent traffic
                    await loop.run_in_executor(None, barrier.wait, _STALL_TIMEOUT_S)
                    _sync(device)
                    first = time.perf_counter()
                start = time.perf_counter()
                for connection in connections:
                    await connection.send(message)
                for connection in connections:
                    await connection.recv(_STALL_TIMEOUT_S)
                _sync(device)
                if i >= _WARMUP:
                    round_s.append(time.perf_counter() - start)
            elapsed_s = time.perf_counter() - first
            bytes_per_round = len(connections) * (sum(t.nbytes for t in message.tensors()) + message.hidden.nbytes)
            report(("timing", _SenderTiming(sender, tokens, message.hidden.nbytes, round_s, elapsed_s,
                                            rounds * bytes_per_round)))
    finally:
        for connection in connections:
            await connection.close()


def _init_process_group(dist_backend: str, port: int, rank: int, world_size: int) -> None:
    import torch.distributed as dist
    # NVLink SHARP (multicast) cannot be set up on these machines; NCCL reads these when its communicator starts.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    dist.init_process_group(dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def _collective_p2p(dist_backend: str, device: str, port: int, rank: int, plan: list[tuple[int, int, int]],
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
            for i in range(_WARMUP + round_trips):
                _sync(device)
                start = time.perf_counter()
                if rank == 0:
                    dist.send(buffer, peer)
                    dist.recv(buffer, peer)
                else:
                    dist.recv(buffer, peer)
                    dist.send(buffer, peer)
                _sync(device)  # NCCL calls return once queued on the GPU: the time is the GPU's
                if i >= _WARMUP:
                    round_trip_s.append(time.perf_counter() - start)
            _sync(device)
            start = time.perf_counter()
            for _ in range(stream):
                (dist.send if rank == 0 else dist.recv)(buffer, peer)
            (dist.recv if rank == 0 else dist.send)(ack, peer)
            _sync(device)
            stream_s = time.perf_counter() - start
            if rank == 0:
                report(("row", Row("p2p", dist_backend, device.split(":")[0], "1x1", message_bytes, None, round_trips,
                                   statistics.median(round_trip_s) / 2 * 1e6,
                                   stream * message_bytes / stream_s / 1e9)))
    finally:
        dist.destroy_process_group()


def _collective_m2n(dist_backend: str, device: str, port: int, rank: int, senders: int, receivers: int,
                    plan: list[tuple[int, int]], hidden: int, dtype: str,
                    report: Callable, done: Any, barrier: Any) -> None:
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
            for i in range(_WARMUP + rounds):
                _sync(device)
                if i == _WARMUP:
                    first = time.perf_counter()
                start = time.perf_counter()
                dist.all_to_all_single(received, send, dispatch_out, dispatch_in)
                dist.all_to_all_single(answers, answer, combine_out, combine_in)
                _sync(device)
                if i >= _WARMUP:
                    round_s.append(time.perf_counter() - start)
            elapsed_s = time.perf_counter() - first
            message_bytes = tokens * hidden * dtype_.itemsize
            if is_sender:
                report(("timing", _SenderTiming(rank, tokens, message_bytes, round_s, elapsed_s,
                                                rounds * receivers * 2 * message_bytes)))
    finally:
        dist.destroy_process_group()


_ROLES: dict[str, Callable] = {"p2p_server": _p2p_server, "p2p_client": _p2p_client, "m2n_receiver": _m2n_receiver,
                               "m2n_sender": _m2n_sender, "collective_p2p": _collective_p2p,
                               "collective_m2n": _collective_m2n}


# ---- the parent: spawn, collect, merge ----------------------------------------------------------------------

def _run_processes(label: str, roles: list[tuple[str, dict[str, Any]]], expected: int,
                   barrier_parties: int = 1) -> list[Any]:
    """Spawns one process per role, returns the `expected` reports they make; any failure or stall stops them all."""
    print(f"{label}: starting {len(roles)} processes", file=sys.stderr, flush=True)
    # Children fork from a clean server process that imported torch once (never from this one, which may hold
    # CUDA or UCX state): a spawned child would spend seconds of a 2-core host importing torch again.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    results, done, barrier = context.Queue(), context.Event(), context.Barrier(barrier_parties)
    processes = [context.Process(target=_child_main, args=(role, kwargs, results, done, barrier),
                                 name=f"{label} {role} {i}", daemon=True) for i, (role, kwargs) in enumerate(roles)]
    items: list[Any] = []
    try:
        for process in processes:
            process.start()
        last_word = time.monotonic()
        while len(items) < expected:
            try:
                kind, item = results.get(timeout=0.2)
            except queue.Empty:
                failed = [p for p in processes if p.exitcode not in (None, 0)]
                if failed:
                    raise BenchError(_failure(label, failed[0], results)) from None
                if time.monotonic() - last_word > _STALL_TIMEOUT_S:
                    raise BenchError(f"{label}: no progress for {_STALL_TIMEOUT_S} s") from None
                continue
            last_word = time.monotonic()
            if kind == "error":
                raise BenchError(f"{label}: {item}")
            items.append(item)
            print(f"{label}: {_describe(item)}", file=sys.stderr, flush=True)
        done.set()  # every process closes its links now, all at once
        for process in processes:
            process.join(timeout=30)
            if process.exitcode is None:
                raise BenchError(f"{label}: {process.name} did not exit within 30 s of the end")
            if process.exitcode != 0:
                raise BenchError(_failure(label, process, results))
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
    return items


def _failure(label: str, process: Any, results: Any) -> str:
    """The failed process's own error report if it made one, else its exit code."""
    try:
        while True:
            kind, item = results.get(timeout=1.0)
            if kind == "error":
                return f"{label}: {item}"
    except queue.Empty:
        return f"{label}: {process.name} exited with code {process.exitcode}"


def _describe(item: Any) -> str:
    if isinstance(item, Row):
        return (f"{format_size(item.message_bytes)}: {item.latency_us:.1f} us one way, "
                f"{item.bandwidth_gb_per_s:.3f} GB/s")
    return f"{item.tokens} tokens: sender {item.sender}, median round {statistics.median(item.round_s) * 1e6:.1f} us"


def _p2p_plan(sizes: list[int], iters: int) -> list[tuple[int, int, int]]:
    """(bytes, timed round trips, streamed messages) per size."""
    return [(size, _iters_for(iters, size), _iters_for(iters, size)) for size in sizes]


def _m2n_plan(tokens: list[int], hidden: int, dtype: str, receivers: int, iters: int) -> list[tuple[int, int]]:
    """(tokens, timed rounds) per token count; a sender moves 2 x receivers messages a round."""
    itemsize = getattr(torch, dtype).itemsize
    return [(count, _iters_for(iters, 2 * receivers * count * hidden * itemsize)) for count in tokens]


def _m2n_rows(backend: str, device: str, senders: int, receivers: int, timings: list[_SenderTiming]) -> list[Row]:
    rows = []
    for tokens in sorted({t.tokens for t in timings}):
        of_tokens = [t for t in timings if t.tokens == tokens]
        round_s = [s for t in of_tokens for s in t.round_s]
        # Every sender started timing at the barrier: the slowest one's time covers all the traffic.
        bandwidth = sum(t.bytes_moved for t in of_tokens) / max(t.elapsed_s for t in of_tokens) / 1e9
        rows.append(Row("m2n", backend, device, f"{senders}x{receivers}", of_tokens[0].message_bytes, tokens,
                        len(of_tokens[0].round_s), statistics.median(round_s) * 1e6, bandwidth))
    return rows


def point_to_point(backend: str, device: str, sizes: list[int], iters: int,
                   ucx_progress_mode: str = "thread") -> list[Row]:
    """One-way latency and stream bandwidth between two processes over `backend`'s real transport classes."""
    plan = _p2p_plan(sizes, iters)
    address = _address(backend)
    roles = [(role, dict(backend=backend, device=_device_of(slot, device), address=address, plan=plan,
                         ucx_progress_mode=ucx_progress_mode))
             for slot, role in enumerate(["p2p_client", "p2p_server"])]
    return _run_processes(f"{backend} p2p", roles, expected=len(plan))


def m2n(backend: str, device: str, senders: int, receivers: int, tokens: list[int], hidden: int, dtype: str,
        iters: int, ucx_progress_mode: str = "thread") -> list[Row]:
    """Rounds of one Dispatch from each sender to each receiver and a same-sized Combine back."""
    plan = _m2n_plan(tokens, hidden, dtype, receivers, iters)
    addresses = [_address(backend) for _ in range(receivers)]
    roles = [("m2n_sender", dict(backend=backend, device=_device_of(i, device), sender=i, addresses=addresses,
                                 plan=plan, hidden=hidden, dtype=dtype, ucx_progress_mode=ucx_progress_mode))
             for i in range(senders)]
    roles += [("m2n_receiver", dict(backend=backend, device=_device_of(senders + j, device), address=address,
                                    senders=senders, plan=plan, ucx_progress_mode=ucx_progress_mode))
              for j, address in enumerate(addresses)]
    timings = _run_processes(f"{backend} m2n {senders}x{receivers}", roles, expected=senders * len(plan),
                             barrier_parties=senders)
    return _m2n_rows(backend, device, senders, receivers, timings)


def collective_point_to_point(sizes: list[int], iters: int, dist_backend: str = "nccl") -> list[Row]:
    """torch.distributed send/recv between two processes (NCCL on GPUs 0 and 1; gloo on CPU, for tests)."""
    device = "cuda" if dist_backend == "nccl" else "cpu"
    plan, port = _p2p_plan(sizes, iters), free_port()
    roles = [("collective_p2p", dict(dist_backend=dist_backend, device=_device_of(rank, device), port=port,
                                     rank=rank, plan=plan)) for rank in range(2)]
    return _run_processes(f"{dist_backend} p2p", roles, expected=len(plan))


def collective_m2n(senders: int, receivers: int, tokens: list[int], hidden: int, dtype: str, iters: int,
                   dist_backend: str = "nccl") -> list[Row]:
    """The M2N round as all_to_all_single over senders + receivers ranks, one GPU each for NCCL."""
    device = "cuda" if dist_backend == "nccl" else "cpu"
    plan, port = _m2n_plan(tokens, hidden, dtype, receivers, iters), free_port()
    roles = [("collective_m2n", dict(dist_backend=dist_backend, device=_device_of(rank, device), port=port,
                                     rank=rank, senders=senders, receivers=receivers, plan=plan, hidden=hidden,
                                     dtype=dtype)) for rank in range(senders + receivers)]
    timings = _run_processes(f"{dist_backend} m2n {senders}x{receivers}", roles, expected=senders * len(plan))
    return _m2n_rows(dist_backend, device, senders, receivers, timings)


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


def run(config: BenchConfig) -> tuple[list[Row], list[str]]:
    notes = check(config)
    for note in notes:
        print(note, file=sys.stderr)
    rows: list[Row] = []
    for backend in config.backends:
        rows += point_to_point(backend, config.device, config.sizes, config.iters, config.ucx_progress_mode)
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
              "sender's time. GB = 1e9 bytes.", *notes]
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    device = args.device
    senders, x, receivers = args.m2n.lower().partition("x")
    if not (x and senders.isdigit() and receivers.isdigit()):
        raise BenchError(f"--m2n {args.m2n!r}: expected SENDERSxRECEIVERS, e.g. 2x2")
    try:
        tokens = [int(part) for part in args.tokens.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"--tokens {args.tokens!r}: expected comma-separated token counts, e.g. 1,16,64") from None
    backends = args.backends or ("ucx" if device == "cuda" else ",".join(BACKENDS))
    return BenchConfig([b.strip() for b in backends.split(",") if b.strip()], device,
                       parse_sizes(args.sizes or (CUDA_SIZES if device == "cuda" else CPU_SIZES)), args.iters,
                       int(senders), int(receivers), tokens, args.hidden, args.dtype, args.nccl,
                       getattr(args, "ucx_progress_mode", "thread"))


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
