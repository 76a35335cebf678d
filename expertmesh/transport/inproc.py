"""In-process backend for unit tests: asyncio queues, tensors passed by reference.

Same semantics as the real backends (per-connection order, listener answers by peer id), no sockets."""
from __future__ import annotations

import asyncio
import itertools

from .base import Connection, Listener, PeerId, Transport, TransportError
from .protocol import Message


class InprocListener(Listener):
    def __init__(self, address: str) -> None:
        self.address = address
        self.inbox: asyncio.Queue[tuple[PeerId, Message]] = asyncio.Queue()
        self.replies: dict[PeerId, asyncio.Queue[Message]] = {}

    async def recv(self) -> tuple[PeerId, Message]:
        return await self.inbox.get()

    async def send(self, peer: PeerId, message: Message) -> None:
        if peer not in self.replies:
            raise TransportError(f"{self.address}: no peer {peer!r}")
        self.replies[peer].put_nowait(message)

    async def close(self) -> None:
        _LISTENERS.pop(self.address, None)


class InprocConnection(Connection):
    def __init__(self, listener: InprocListener, peer: PeerId) -> None:
        self._listener = listener
        self._peer = peer
        self._replies: asyncio.Queue[Message] = asyncio.Queue()
        listener.replies[peer] = self._replies

    async def send(self, message: Message) -> None:
        self._listener.inbox.put_nowait((self._peer, message))

    async def recv(self, timeout_s: float | None = None) -> Message:
        try:
            return await asyncio.wait_for(self._replies.get(), timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(f"no message from {self._listener.address} within {timeout_s} s") from None

    async def close(self) -> None:
        self._listener.replies.pop(self._peer, None)


_LISTENERS: dict[str, InprocListener] = {}
_PEER_IDS = itertools.count()


class InprocTransport(Transport):
    async def listen(self, address: str) -> Listener:
        if address in _LISTENERS:
            raise TransportError(f"address in use: {address}")
        _LISTENERS[address] = listener = InprocListener(address)
        return listener

    async def connect(self, address: str) -> Connection:
        if address not in _LISTENERS:
            raise TransportError(f"nothing listens on {address}")
        return InprocConnection(_LISTENERS[address], next(_PEER_IDS))
