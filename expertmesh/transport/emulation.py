"""Link emulation for experiments on one host: added one-way latency and a bandwidth cap per link.

Wraps any Connection. A message leaves when the link is free, occupies it for bytes / bandwidth, and
arrives `latency` later; the sender does not wait (as with a NIC's queue). Off unless configured."""
from __future__ import annotations

import asyncio
import time

from .base import Connection, TransportError
from .protocol import Message


class _Link:
    """One direction of a link: when its last message finishes serialising."""

    def __init__(self, latency_s: float, bytes_per_s: float) -> None:
        self.latency_s = latency_s
        self.bytes_per_s = bytes_per_s
        self.free_at = 0.0

    def arrival(self, nbytes: int) -> float:
        depart = max(time.monotonic(), self.free_at)
        self.free_at = depart + (nbytes / self.bytes_per_s if self.bytes_per_s else 0.0)
        return self.free_at + self.latency_s


def _nbytes(message: Message) -> int:
    return len(message.encode_header()) + sum(t.nbytes for t in message.tensors())


class EmulatedConnection(Connection):
    def __init__(self, inner: Connection, latency_us: float, bandwidth_gbps: float) -> None:
        self.inner = inner
        bytes_per_s = bandwidth_gbps * 1e9 / 8
        self._out, self._in = _Link(latency_us / 1e6, bytes_per_s), _Link(latency_us / 1e6, bytes_per_s)
        self._outbox: asyncio.Queue[tuple[float, Message]] = asyncio.Queue()
        self._inbox: asyncio.Queue[tuple[float, Message] | Exception] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._deliver()), asyncio.create_task(self._receive())]

    async def _deliver(self) -> None:
        while True:
            due, message = await self._outbox.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await self.inner.send(message)

    async def _receive(self) -> None:
        """Stamps each reply with its emulated arrival as soon as it really arrives."""
        while True:
            try:
                message = await self.inner.recv()
            except Exception as exc:
                self._inbox.put_nowait(exc)
                return
            self._inbox.put_nowait((self._in.arrival(_nbytes(message)), message))

    async def send(self, message: Message) -> None:
        self._outbox.put_nowait((self._out.arrival(_nbytes(message)), message))

    async def recv(self, timeout_s: float | None = None) -> Message:
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(f"no message within {timeout_s} s (emulated link)") from None
        if isinstance(item, Exception):
            raise item
        due, message = item
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        return message

    def on_peer_lost(self, callback) -> None:
        self.inner.on_peer_lost(callback)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.inner.close()


def emulate(connection: Connection, latency_us: float, bandwidth_gbps: float) -> Connection:
    """The connection itself when emulation is off, else wrapped."""
    if latency_us <= 0 and bandwidth_gbps <= 0:
        return connection
    return EmulatedConnection(connection, latency_us, bandwidth_gbps)
