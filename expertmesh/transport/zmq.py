"""pyzmq backend: ROUTER listener, DEALER connections, one frame per header and per tensor.

Tensors are handed to zmq as memoryviews of their storage (zmq copies only frames under its copy threshold)."""
from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from .base import Connection, Listener, PeerId, Transport, TransportError
from .protocol import Message, decode_frames, encode_frames


def _frames_of(parts: list[zmq.Frame]) -> list[memoryview]:
    return [part.buffer for part in parts]


class ZmqConnection(Connection):
    def __init__(self, socket: zmq.asyncio.Socket, address: str) -> None:
        self._socket = socket
        self.address = address

    async def send(self, message: Message) -> None:
        await self._socket.send_multipart(encode_frames(message), copy=False)

    async def recv(self, timeout_s: float | None = None) -> Message:
        try:
            parts = await asyncio.wait_for(self._socket.recv_multipart(copy=False), timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(f"no message from {self.address} within {timeout_s} s") from None
        return decode_frames(_frames_of(parts))

    async def close(self) -> None:
        self._socket.close(linger=0)


class ZmqListener(Listener):
    def __init__(self, socket: zmq.asyncio.Socket, address: str) -> None:
        self._socket = socket
        self.address = address

    async def recv(self) -> tuple[PeerId, Message]:
        identity, *parts = await self._socket.recv_multipart(copy=False)
        return identity.bytes, decode_frames(_frames_of(parts))

    async def send(self, peer: PeerId, message: Message) -> None:
        await self._socket.send_multipart([peer, *encode_frames(message)], copy=False)

    async def close(self) -> None:
        self._socket.close(linger=0)


class ZmqTransport(Transport):
    def __init__(self) -> None:
        self._context = zmq.asyncio.Context.instance()

    async def listen(self, address: str) -> Listener:
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises instead of vanishing
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.bind(address)
        except zmq.ZMQError as exc:
            socket.close()
            raise TransportError(f"cannot listen on {address}: {exc}") from exc
        return ZmqListener(socket, address)

    async def connect(self, address: str) -> Connection:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)  # asynchronous: the caller's first recv with a timeout proves the peer is there
        return ZmqConnection(socket, address)
