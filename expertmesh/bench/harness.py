"""What every `expertmesh bench transport` process shares: the rows and timings it reports, sizes and iteration
plans, and `run_processes`, which starts one process per role, collects their reports and stops them on a failure."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import torch

WARMUP = 3  # untimed round trips (rounds) per size: connections, allocators and UCX's registration caches settle
MIN_ITERS = 5
BYTES_PER_SIZE = 256 << 20  # what one size may move per measurement: fewer iterations for large messages
STALL_TIMEOUT_S = 120.0  # no word from any benchmark process for this long: something hangs
CONNECT_TIMEOUT_S = 30.0  # a listener may still be importing torch when its peers start

TOP_K = 2  # experts per token in the M2N rows (Mixtral's): their ids and weights ride with the hidden states

P2pPlan = list[tuple[int, int, int]]  # (message bytes, timed round trips, streamed messages) per size
M2nPlan = list[tuple[int, int]]  # (tokens, timed rounds) per token count


class BenchError(RuntimeError):
    """The benchmark cannot run as asked, or one of its processes failed."""


@dataclass
class Row:
    pattern: str  # "p2p" or "m2n"
    backend: str  # "zmq", "ucx", "ucxx-raw", "nccl" (or "gloo" in tests)
    device: str
    processes: str  # "1x1" point to point, else senders x receivers
    message_bytes: int  # p2p: the message; m2n: one sender's hidden states for one receiver
    tokens: int | None
    iters: int  # timed round trips (p2p) or rounds per sender (m2n)
    latency_us: float  # p2p: one way, half the median round trip; m2n: the median round
    bandwidth_gb_per_s: float  # GB = 1e9 bytes; p2p: a one-way stream; m2n: all links, both ways


@dataclass
class SenderTiming:
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


def iters_for(iters: int, nbytes: int) -> int:
    """`iters`, or as many as move BYTES_PER_SIZE for large messages, but not fewer than MIN_ITERS."""
    return max(min(iters, MIN_ITERS), min(iters, BYTES_PER_SIZE // max(1, nbytes)))


def p2p_plan(sizes: list[int], iters: int) -> P2pPlan:
    return [(size, iters_for(iters, size), iters_for(iters, size)) for size in sizes]


def m2n_plan(tokens: list[int], hidden: int, dtype: str, receivers: int, iters: int) -> M2nPlan:
    """A sender moves 2 x receivers messages a round."""
    itemsize = getattr(torch, dtype).itemsize
    return [(count, iters_for(iters, 2 * receivers * count * hidden * itemsize)) for count in tokens]


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_of(slot: int, device: str) -> str:
    """Process `slot` of a measurement gets its own GPU while there are enough, then they wrap (as the launcher's)."""
    return "cpu" if device == "cpu" else f"cuda:{slot % max(1, gpu_count())}"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def nccl_without_multicast() -> None:
    """NVLink SHARP (multicast) cannot be set up on these machines; NCCL reads these when its communicator starts."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"


# ---- measuring, inside the benchmark processes ----------------------------------------------------------------

async def time_p2p(device: str, round_trips: int, stream: int, send: Callable[[], Awaitable],
                   recv: Callable[[], Awaitable], recv_ack: Callable[[], Awaitable] | None = None,
                   ) -> tuple[list[float], float]:
    """The point-to-point measurement of every async backend: WARMUP + `round_trips` ping-pongs (the timed ones'
    seconds), then `stream` sends and the peer's ack of them all (the stream's seconds). `recv_ack` takes the
    ack where it lands elsewhere than the echoes (default: `recv`)."""
    round_trip_s = []
    for i in range(WARMUP + round_trips):
        sync(device)
        start = time.perf_counter()
        await send()
        await recv()
        sync(device)
        if i >= WARMUP:
            round_trip_s.append(time.perf_counter() - start)
    sync(device)
    start = time.perf_counter()
    for _ in range(stream):
        await send()
    await (recv_ack or recv)()  # every message is in
    sync(device)
    return round_trip_s, time.perf_counter() - start


def p2p_row(backend: str, device: str, message_bytes: int, round_trip_s: list[float], stream: int,
            stream_s: float) -> Row:
    return Row("p2p", backend, device.split(":")[0], "1x1", message_bytes, None, len(round_trip_s),
               statistics.median(round_trip_s) / 2 * 1e6, stream * message_bytes / stream_s / 1e9)


def m2n_rows(backend: str, device: str, senders: int, receivers: int, timings: list[SenderTiming]) -> list[Row]:
    rows = []
    for tokens in sorted({t.tokens for t in timings}):
        of_tokens = [t for t in timings if t.tokens == tokens]
        round_s = [s for t in of_tokens for s in t.round_s]
        # Every sender started timing at the barrier: the slowest one's time covers all the traffic.
        bandwidth = sum(t.bytes_moved for t in of_tokens) / max(t.elapsed_s for t in of_tokens) / 1e9
        rows.append(Row("m2n", backend, device, f"{senders}x{receivers}", of_tokens[0].message_bytes, tokens,
                        len(of_tokens[0].round_s), statistics.median(round_s) * 1e6, bandwidth))
    return rows


async def wait_done(done: Any) -> None:
    """Serving processes stay until every measuring one has its answers (a zmq socket or UCX endpoint closed at
    once may drop what it has not sent yet)."""
    await asyncio.get_running_loop().run_in_executor(None, done.wait, STALL_TIMEOUT_S)


async def wait_barrier(barrier: Any) -> None:
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait, STALL_TIMEOUT_S)


# ---- the processes: spawn, collect --------------------------------------------------------------------------

Role = Callable[..., Any]  # a module-level function (a coroutine function or not) taking report, done, barrier


def role_name(role: Role) -> str:
    return role.__name__.lstrip("_")


def child_main(role: Role, kwargs: dict[str, Any], results: Any, done: Any, barrier: Any) -> None:
    """Entry of every benchmark process: rows and timings go to `results`, a failure as ("error", text)."""
    torch.set_num_threads(1)  # several processes share the host's cores; nothing here computes
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # UCXX logs to stdout: keep the parent's stdout for the table
    device = kwargs.get("device", "cpu")
    report = results.put
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        if asyncio.iscoroutinefunction(role):
            import uvloop  # as in the serving processes
            uvloop.run(role(report=report, done=done, barrier=barrier, **kwargs))
        else:
            role(report=report, done=done, barrier=barrier, **kwargs)
    except BaseException as exc:
        report(("error", f"{role_name(role)} on {device}: {exc!r}"))
        sys.exit(1)


def run_processes(label: str, roles: list[tuple[Role, dict[str, Any]]], expected: int,
                  barrier_parties: int = 1) -> list[Any]:
    """Spawns one process per role, returns the `expected` reports they make; any failure or stall stops them all."""
    print(f"{label}: starting {len(roles)} processes", file=sys.stderr, flush=True)
    # Children fork from a clean server process that imported torch and the roles' modules once (never from this
    # one, which may hold CUDA or UCX state): a spawned child would spend seconds of a 2-core host importing torch.
    # Roles travel to the children by reference (module and name), hence module-level functions.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *sorted({role.__module__ for role, _ in roles})])
    results, done, barrier = context.Queue(), context.Event(), context.Barrier(barrier_parties)
    processes = [context.Process(target=child_main, args=(role, kwargs, results, done, barrier),
                                 name=f"{label} {role_name(role)} {i}", daemon=True)
                 for i, (role, kwargs) in enumerate(roles)]
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
                if time.monotonic() - last_word > STALL_TIMEOUT_S:
                    raise BenchError(f"{label}: no progress for {STALL_TIMEOUT_S} s") from None
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
