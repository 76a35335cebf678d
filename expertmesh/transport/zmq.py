"""pyzmq backend: ROUTER listener, DEALER connections, one frame per header and per tensor.

Each socket is owned by one I/O thread that blocks in zmq_poll; the event loop talks to it through
queues. (zmq.asyncio relies on the edge-triggered ZMQ_FD and was seen here to miss wake-ups and hang
under concurrent traffic, with uvloop; cf. pyzmq issue #2173.) Tensors are handed to zmq as memoryviews
of their storage: zmq copies only frames under its copy threshold. A connection reports its peer's loss (the TCP
session breaking) to whoever asked (`on_peer_lost`): zmq itself would silently reconnect and queue."""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import Callable, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from .base import Connection, Listener, PeerId, Transport, TransportError
from .protocol import Message, decode_frames, encode_frames

_wake_ids = itertools.count()


class _SocketThread:
    """Owns one zmq socket: sends what `send` queues, delivers what arrives to an asyncio queue."""

    def __init__(self, context: zmq.Context, socket: zmq.Socket, name: str, monitor: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        # a connection's monitor: the session with the peer broke (it died or closed); called on the event loop
        self._monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED) if monitor else None
        self.peer_lost: list[Callable[[], None]] = []
        self.inbox: asyncio.Queue[list[zmq.Frame] | Exception] = asyncio.Queue()
        self._outbox: queue.SimpleQueue[Sequence | asyncio.Future] = queue.SimpleQueue()  # frames, or a flush mark
        wake_address = f"inproc://expertmesh-wake-{next(_wake_ids)}"
        self._wake_rx = context.socket(zmq.PULL)
        self._wake_rx.bind(wake_address)
        self._wake_tx = context.socket(zmq.PUSH)  # used only from the event loop's thread
        self._wake_tx.connect(wake_address)
        self._socket = socket
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def send(self, frames: Sequence) -> None:
        if self._closed:
            raise TransportError("socket is closed")
        self._outbox.put(frames)
        self._wake_tx.send(b"", copy=True)

    async def flushed(self) -> None:
        """Returns once zmq holds every message sent before: see Connection.flushed."""
        mark = self.loop.create_future()
        self.send(mark)
        await mark

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_rx in ready:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                    if self._closed:
                        break
                    while not self._outbox.empty():
                        item = self._outbox.get()
                        if isinstance(item, asyncio.Future):
                            self.loop.call_soon_threadsafe(_settle, item, None)
                        else:
                            self._socket.send_multipart(item, copy=False)
                if self._socket in ready:
                    while self._socket.poll(0):
                        frames = self._socket.recv_multipart(copy=False)
                        self.loop.call_soon_threadsafe(self.inbox.put_nowait, frames)
                if self._monitor is not None and self._monitor in ready:
                    while self._monitor.poll(0):
                        if recv_monitor_message(self._monitor)["event"] == zmq.EVENT_DISCONNECTED:
                            self.loop.call_soon_threadsafe(self._report_peer_lost)
        except Exception as exc:  # a send to a vanished peer, or the context going away
            if not self._closed:
                self.loop.call_soon_threadsafe(self.inbox.put_nowait, TransportError(f"zmq socket failed: {exc!r}"))
        finally:
            while not self._outbox.empty():  # a flush waiting on a socket that is gone must not wait for ever
                item = self._outbox.get()
                if isinstance(item, asyncio.Future):
                    self.loop.call_soon_threadsafe(_settle, item, TransportError("zmq socket closed"))
            if self._monitor is not None:
                self._socket.disable_monitor()
                self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._wake_rx.close(linger=0)

    def _report_peer_lost(self) -> None:
        if not self._closed:
            for callback in self.peer_lost:
                callback()

    async def recv(self, timeout_s: float | None, source: str) -> list[zmq.Frame]:
        try:
            item = await asyncio.wait_for(self.inbox.get(), timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(f"no message from {source} within {timeout_s} s") from None
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wake_tx.send(b"")
            self._thread.join(timeout=5)
            self._wake_tx.close(linger=0)


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if not future.done():
        future.set_result(None) if error is None else future.set_exception(error)


class ZmqConnection(Connection):
    def __init__(self, io: _SocketThread, address: str) -> None:
        self._io = io
        self.address = address

    async def send(self, message: Message) -> None:
        self._io.send(encode_frames(message))

    async def flushed(self) -> None:
        await self._io.flushed()

    async def recv(self, timeout_s: float | None = None) -> Message:
        frames = await self._io.recv(timeout_s, self.address)
        return decode_frames([f.buffer for f in frames])

    def on_peer_lost(self, callback: Callable[[], None]) -> None:
        self._io.peer_lost.append(callback)

    async def close(self) -> None:
        self._io.close()


class ZmqListener(Listener):
    def __init__(self, io: _SocketThread, address: str) -> None:
        self._io = io
        self.address = address

    async def recv(self) -> tuple[PeerId, Message]:
        identity, *frames = await self._io.recv(None, self.address)
        return identity.bytes, decode_frames([f.buffer for f in frames])

    async def send(self, peer: PeerId, message: Message) -> None:
        self._io.send([peer, *encode_frames(message)])

    async def close(self) -> None:
        self._io.close()


class ZmqTransport(Transport):
    def __init__(self) -> None:
        self._context = zmq.Context.instance()

    async def listen(self, address: str) -> Listener:
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises instead of vanishing
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.bind(address)
        except zmq.ZMQError as exc:
            socket.close()
            raise TransportError(f"cannot listen on {address}: {exc}") from exc
        return ZmqListener(_SocketThread(self._context, socket, f"zmq-listen-{address}"), address)

    async def connect(self, address: str) -> Connection:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)  # asynchronous: the caller's first recv with a timeout proves the peer is there
        return ZmqConnection(_SocketThread(self._context, socket, f"zmq-connect-{address}", monitor=True), address)
