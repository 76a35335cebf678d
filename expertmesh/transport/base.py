"""The transport interface every backend implements: a listener that many peers connect to, and connections.

Messages are `protocol.Message` objects with any number of tensors; backends decide how the buffers move."""
from __future__ import annotations

import abc
import asyncio
from typing import Callable, Hashable

from .protocol import Message

PeerId = Hashable


class TransportError(ConnectionError):
    """A peer could not be reached, went away, or did not answer in time."""


class _Recycler:
    def recycle(self, message: Message) -> None:
        """The caller is done with this received message's tensors: a backend that allocates receive memory may
        reuse it for a later message (the default ignores it). The tensors must not be used afterwards."""


class Connection(_Recycler, abc.ABC):
    """One side of a link to a listener: send requests, receive replies (in the order the peer sends them)."""

    @abc.abstractmethod
    async def send(self, message: Message) -> None: ...

    @abc.abstractmethod
    async def recv(self, timeout_s: float | None = None) -> Message:
        """The next message; TransportError if none arrives within timeout_s or the peer is gone."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def flushed(self) -> None:
        """Returns once every message sent so far is out of this process's Python threads (in the transport's own
        hands), so that no thread holding the GIL can hold one back. The lockstep M2N waits for its step plan so
        before any round: a round's device work may be pending on the expert node's answer, and a host call that
        waits for the device (CUDA loading a kernel at its first launch) holds the GIL meanwhile. Default: a
        send is handed over when it returns."""

    def on_peer_lost(self, callback: Callable[[], None]) -> None:
        """Calls callback on the event loop when an established link to the peer breaks (it died or closed). Where a
        backend's recv fails by itself then (ucx, inproc), it need not: the default never calls it."""


class Listener(_Recycler, abc.ABC):
    """The serving side: receives from every connected peer and answers a peer by its id."""

    @abc.abstractmethod
    async def recv(self) -> tuple[PeerId, Message]: ...

    @abc.abstractmethod
    async def send(self, peer: PeerId, message: Message) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class Transport(abc.ABC):
    @abc.abstractmethod
    async def listen(self, address: str) -> Listener: ...

    @abc.abstractmethod
    async def connect(self, address: str) -> Connection: ...


async def connect_within(transport: Transport, address: str, timeout_s: float) -> Connection:
    """Connects, retrying while the peer is not listening yet (it may still be loading weights),
    until timeout_s has passed; then the last error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await transport.connect(address)
        except TransportError:
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.5)


def resolve_backend(backend: str, device: str = "cpu") -> str:
    """'auto' is, on GPUs, lockstep (the lockstep M2N, each link's backend by locality: CUDA IPC within a host, the
    fastest path measured, NCCL across hosts; m2n/link_plan.py); on CPU ucx wherever ucxx imports, else zmq (the
    launcher prints which). Other names stay as they are."""
    if backend != "auto":
        return backend
    if device == "cuda":
        return "lockstep"
    try:
        from .ucx_context import import_ucxx
        import_ucxx()
    except (ImportError, TransportError):
        return "zmq"
    return "ucx"


def make_transport(backend: str, device: str = "cpu", ucx_progress_mode: str = "thread") -> Transport:
    """The backend named in TransportConfig.backend; an unknown or uninstalled one is an error, never a fallback.

    `device` is where received tensors land; only ucx can receive into (and send from) CUDA memory, the others
    carry CPU tensors. `ucx_progress_mode` (TransportConfig's) only concerns ucx."""
    backend = resolve_backend(backend)
    if backend == "zmq":
        from .zmq import ZmqTransport
        return ZmqTransport()
    if backend == "inproc":
        from .inproc import InprocTransport
        return InprocTransport()
    if backend == "ucx":
        from .ucx import UcxTransport
        return UcxTransport(device=device, progress_mode=ucx_progress_mode)
    raise ValueError(f"unknown transport backend {backend!r}; choose 'zmq', 'ucx' or 'inproc'")
