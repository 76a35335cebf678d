"""UCX backend (ucxx): a message is one tagged frame with its header (and a small message's bytes), then its tensors:
one packed frame when they lie back to back in one buffer, else one frame per tensor.

Tensors move from and into their own memory: numpy views of CPU storage, device pointers of CUDA tensors (no staging
through the host); the receiver takes memory on its device from a pool that recycled messages refill, and UCX writes
into it."""
from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import time
from typing import Any, Callable

import numpy as np
import torch

from .base import Connection, Listener, PeerId, Transport, TransportError
from .protocol import (Message, ProtocolError, TensorMeta, build_message, decode_header, packed_offsets,
                       packed_span, packed_views)
from .recv_pool import ReceivePool
from .ucx_context import PROGRESS_MODES, LoopContext, acquire_context, import_ucxx, release_context, ucx_options

log = logging.getLogger(__name__)

# The first frame of a message has a fixed size so the receiver can post it before knowing what comes:
# a prefix (header length, flags), the header, and, for a small message of CPU tensors, the tensors' bytes
# too. Copying a few KiB costs far less than a frame: each frame's completion travels from UCX's progress
# thread through ucxx's notifier thread to the event loop (~150 us on a 2-core host). Larger tensors get one
# frame each, straight from their memory; only a header longer than the first frame needs a frame of its own.
#
# A message whose tensors lie back to back in one storage (protocol.packed_offsets: M2N carves its send buffers
# so) and fit in _PACKED_MAX_BYTES travels as the first frame plus one "packed" frame on a tag of its own. The
# receiver keeps a receive for the next packed frame posted at all times, into pooled memory, so both frames
# complete together: one completion to wait for per message instead of two in sequence.
_FIRST_FRAME_BYTES = 64 * 1024
_PREFIX = struct.Struct("<IB3x")  # header length, flags
_INLINE = 1  # flag: the tensors' bytes follow the header in the first frame
_PACKED = 2  # flag: the tensors follow in one packed frame
_PACKED_TAG = 1  # ucxx hashes it with the endpoint's own tag; headers and one-per-tensor frames use the default
_PACKED_MAX_BYTES = 4 << 20  # covers decode-size M2N messages (256 tokens x 4096 x bf16 = 2 MiB + ids)
_PACK_CUDA = False  # CUDA tensors keep one frame each until tests/gpu have run the packed path on a GPU
_HEADER_IN_FIRST_FRAME = _FIRST_FRAME_BYTES - _PREFIX.size
_POLL_STREAM_S = 500e-6  # how long the loop polls a CUDA event before a thread waits for it


def _parse_address(address: str) -> tuple[str, int]:
    scheme, sep, rest = address.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "ucx" or not sep or not colon or not host or not port.isdigit():
        raise ValueError(f"ucx address must look like ucx://HOST:PORT, got {address!r}")
    return host, int(port)


# ---- messages over one endpoint ---------------------------------------------------------------------------------

def _wire_view(tensor: torch.Tensor) -> Any:
    """The tensor's bytes, sharing its memory: a numpy view on CPU (bf16 has no numpy dtype, uint8 views
    serve every dtype), the uint8 tensor itself on CUDA (ucxx reads __cuda_array_interface__)."""
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    return flat.numpy() if flat.device.type == "cpu" else flat


async def _wait_for_stream(device: torch.device) -> None:
    """UCX moves device memory outside torch's streams: wait until the work queued on the current stream
    (which produced the tensors we send, or last used the memory the allocator just handed us) is done.

    A decode step's kernels finish within microseconds, so the loop polls the event first (other coroutines
    run between polls); only a longer wait goes to a thread, whose hop alone costs ~100 us."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    deadline = time.perf_counter() + _POLL_STREAM_S
    while not event.query():
        if time.perf_counter() > deadline:
            await asyncio.get_running_loop().run_in_executor(None, event.synchronize)
            return
        await asyncio.sleep(0)


async def _recv_all(endpoint: Any, buffers: list[Any]) -> None:
    """Receive into buffers in order. gather starts its tasks in argument order and each posts its recv before
    its first await: posted in order (UCX matches same-tag messages in posting order), received concurrently."""
    if len(buffers) == 1:
        await endpoint.recv(buffers[0])
        return
    results = await asyncio.gather(*(endpoint.recv(buffer) for buffer in buffers), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class _Link:
    """One ucxx endpoint carrying whole messages. A send lock keeps concurrent senders' frames from
    interleaving; one reader task receives messages in order and hands them to `deliver`, so a recv that
    times out or is cancelled never leaves half a message on the wire."""

    def __init__(self, endpoint: Any, pool: ReceivePool, name: str,
                 deliver: Callable[[Message], None], fail: Callable[[Exception], None]) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.device = pool.device
        self.name = name
        self._deliver = deliver
        self._fail = fail
        self._send_lock = asyncio.Lock()
        self._first_frame = np.empty(_FIRST_FRAME_BYTES, dtype=np.uint8)
        self._packed: asyncio.Future[torch.Tensor] | None = None  # the posted receive of the next packed frame
        self._reader = asyncio.create_task(self._read(), name=f"ucx-reader-{name}")

    async def send(self, message: Message) -> None:
        header = message.encode_header()  # checks contiguity: we send the tensors' memory as it is
        tensors = [t for t in message.tensors() if t.numel() > 0]  # sizes are in the header; no 0-byte frames
        cuda_devices = {t.device for t in tensors if t.device.type == "cuda"}
        if cuda_devices and self.device.type != "cuda":
            raise TransportError(f"{self.name}: {type(message).__name__} holds tensors on "
                                 f"{sorted(map(str, cuda_devices))} but this ucx transport was made for device "
                                 f"{str(self.device)!r} (its UCX has no CUDA transports); make it with device='cuda'")
        if len(header) >= 1 << 32:
            raise TransportError(f"{self.name}: {type(message).__name__} header of {len(header)} bytes is too long")
        inline = _PREFIX.size + len(header) + sum(t.nbytes for t in tensors) <= _FIRST_FRAME_BYTES and not cuda_devices
        packed = None if inline or not tensors or (cuda_devices and not _PACK_CUDA) \
            or len(header) > _HEADER_IN_FIRST_FRAME else packed_span(message.tensors(), _PACKED_MAX_BYTES)
        if inline:
            frames = [(b"".join([_PREFIX.pack(len(header), _INLINE), header, *map(_wire_view, tensors)]), None)]
        elif packed is not None:
            frames = [(_PREFIX.pack(len(header), _PACKED) + header, None), (_wire_view(packed), _PACKED_TAG)]
        else:
            frames = [(_PREFIX.pack(len(header), 0) + header[:_HEADER_IN_FIRST_FRAME], None)]
            if len(header) > _HEADER_IN_FIRST_FRAME:
                frames.append((header[_HEADER_IN_FIRST_FRAME:], None))
            frames += [(_wire_view(t), None) for t in tensors]
        for device in cuda_devices:
            await _wait_for_stream(device)
        async with self._send_lock:
            try:
                if len(frames) == 1:  # posted before the first await: nothing can split it
                    await self.endpoint.send(frames[0][0])
                else:
                    # Tasks start in creation order and each posts its frame before its first await, so the
                    # frames are posted in order and travel concurrently. Shielded: a caller cancelled now
                    # must not leave half a message on the wire (the next sender's tasks start after these).
                    sends = [asyncio.ensure_future(self.endpoint.send(frame, tag=tag)) for frame, tag in frames]
                    for result in await asyncio.shield(asyncio.gather(*sends, return_exceptions=True)):
                        if isinstance(result, BaseException):
                            raise result
            except Exception as exc:
                raise TransportError(f"{self.name}: send failed, the peer is gone: {exc!r}") from exc
        if self.endpoint.closed:  # ucxx returns normally from a send that the endpoint's failure cancelled
            raise TransportError(f"{self.name}: send failed, the peer is gone (endpoint closed)")

    async def _read_message(self) -> Message:
        first = self._first_frame
        await self.endpoint.recv(first)
        length, flags = _PREFIX.unpack_from(first, 0)
        end = _PREFIX.size + length
        header = first[_PREFIX.size:min(end, _FIRST_FRAME_BYTES)].tobytes()
        if end > _FIRST_FRAME_BYTES:
            rest = np.empty(end - _FIRST_FRAME_BYTES, dtype=np.uint8)
            await self.endpoint.recv(rest)
            header += rest.tobytes()
        cls, scalars, metas = decode_header(header)
        if flags & _PACKED:
            if packed_offsets(metas)[1] > _PACKED_MAX_BYTES:
                raise ProtocolError(f"{self.name}: packed {cls.__name__} with tensors {metas} exceeds the packed frame")
            flat = await self._packed
            self._post_packed()
            return build_message(cls, scalars, packed_views(flat, metas))
        tensors = [self.pool.empty(meta) for meta in metas]
        if flags & _INLINE:
            if end + sum(meta.nbytes for meta in metas) > _FIRST_FRAME_BYTES:
                raise ProtocolError(f"{self.name}: {cls.__name__} with tensors {metas} cannot fit in one frame")
            for tensor in tensors:  # copied out now: the frame buffer takes the next message
                nbytes = tensor.nbytes
                tensor.reshape(-1).view(torch.uint8).copy_(torch.from_numpy(first[end:end + nbytes]))
                end += nbytes
        elif tensors:
            if self.device.type == "cuda":
                await _wait_for_stream(self.device)
            await _recv_all(self.endpoint, [_wire_view(t) for t in tensors if t.numel() > 0])
        return build_message(cls, scalars, tensors)

    def _post_packed(self) -> None:
        """Posts the receive of the next packed frame into pooled memory (after the stream is done with it)."""
        async def receive(flat: torch.Tensor) -> torch.Tensor:
            if self.device.type == "cuda":
                await _wait_for_stream(self.device)
            await self.endpoint.recv(_wire_view(flat), tag=_PACKED_TAG)
            return flat
        self._packed = asyncio.ensure_future(receive(self.pool.empty(TensorMeta(torch.uint8, (_PACKED_MAX_BYTES,)))))

    async def _read(self) -> None:
        from ucxx.exceptions import UCXError
        self._post_packed()
        try:
            while True:
                self._deliver(await self._read_message())
        except asyncio.CancelledError:
            raise
        except UCXError as exc:  # the peer is gone: UCX cancels our pending recv (within ms over TCP)
            error = TransportError(f"{self.name}: peer lost: {exc!r}")
            error.__cause__ = exc
            self._fail(error)
        except Exception as exc:  # a malformed header, or no memory for the tensors: the stream is unusable
            self._fail(exc)
        finally:
            self._packed.cancel()
            self._packed.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure was reported

    async def close(self) -> None:
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
        await self.endpoint.close(period=10**9)  # ns: how long ucxx may wait for the progress thread to close it


class UcxConnection(Connection):
    def __init__(self, endpoint: Any, context: LoopContext, address: str, device: torch.device) -> None:
        self.address = address
        self._context = context
        self._inbox: asyncio.Queue[Message | Exception] = asyncio.Queue()
        self._pool = ReceivePool(device)
        self._link = _Link(endpoint, self._pool, address, self._inbox.put_nowait, self._inbox.put_nowait)
        self._closed = False

    def recycle(self, message: Message) -> None:
        self._pool.give_back_message(message)

    async def send(self, message: Message) -> None:
        if self._closed:
            raise TransportError(f"{self.address}: connection is closed")
        await self._link.send(message)

    async def recv(self, timeout_s: float | None = None) -> Message:
        if self._closed:
            raise TransportError(f"{self.address}: connection is closed")
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout_s)
        except asyncio.TimeoutError:
            raise TransportError(f"no message from {self.address} within {timeout_s} s") from None
        if isinstance(item, Exception):
            self._inbox.put_nowait(item)  # the link is dead: every later recv fails the same way
            raise item
        return item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put_nowait(TransportError(f"{self.address}: connection is closed"))  # wakes a waiting recv
        try:
            await self._link.close()
        finally:
            release_context(self._context)


class UcxListener(Listener):
    """Accepts any number of peers; each gets an int id and a reader task feeding one shared inbox."""

    def __init__(self, context: LoopContext, address: str, port: int, device: torch.device) -> None:
        self.address = address
        self._context = context
        self._pool = ReceivePool(device)  # shared by the peers' links: they bring the same sizes
        self._inbox: asyncio.Queue[tuple[PeerId, Message] | Exception] = asyncio.Queue()
        self._links: dict[int, _Link] = {}
        self._peer_ids = itertools.count()
        self._closing: set[asyncio.Task] = set()  # endpoints of departed peers being closed
        self._closed = False
        try:
            self._listener = context.ctx.create_listener(self._accept, port)
        except Exception as exc:
            raise TransportError(f"cannot listen on {address}: {exc!r}") from exc

    async def _accept(self, endpoint: Any) -> None:
        if self._closed:
            await endpoint.close()
            return
        peer = next(self._peer_ids)
        name = f"{self.address} peer {peer}"
        self._links[peer] = _Link(endpoint, self._pool, name,
                                  lambda message: self._inbox.put_nowait((peer, message)),
                                  lambda error: self._peer_failed(peer, error))

    def recycle(self, message: Message) -> None:
        self._pool.give_back_message(message)

    def _peer_failed(self, peer: int, error: Exception) -> None:
        # One peer going away (an attention node stopping or dying) must not stop the listener: drop the peer,
        # and answers to it fail. Anything else (a malformed message) surfaces from recv, as with zmq.
        link = self._links.pop(peer, None)
        if link is not None:
            self._closing.add(asyncio.create_task(link.endpoint.close(period=10**9)))
        if isinstance(error, TransportError):
            log.info("%s: peer %d left: %s", self.address, peer, error)
        else:
            self._inbox.put_nowait(error)

    async def recv(self) -> tuple[PeerId, Message]:
        item = await self._inbox.get()
        if isinstance(item, Exception):
            if self._closed:
                self._inbox.put_nowait(item)  # and every later recv
            raise item
        return item

    async def send(self, peer: PeerId, message: Message) -> None:
        link = self._links.get(peer)  # type: ignore[arg-type]
        if link is None:
            raise TransportError(f"{self.address}: no peer {peer!r} (it left, or never connected)")
        await link.send(message)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put_nowait(TransportError(f"{self.address}: listener is closed"))  # wakes a waiting recv
        self._listener.close()
        links, self._links = list(self._links.values()), {}
        try:
            for link in links:
                await link.close()
            await asyncio.gather(*self._closing, return_exceptions=True)
        finally:
            release_context(self._context)


class UcxTransport(Transport):
    """UCX through ucxx. `device` is where received tensors are allocated (and, for 'cuda', enables UCX's
    CUDA transports so CUDA tensors can be sent); `ucx_tls` overrides UCX's transport list (UCX_TLS);
    `progress_mode` says who progresses UCX (one of PROGRESS_MODES, see LoopContext)."""

    def __init__(self, device: str = "cpu", ucx_tls: str | None = None, connect_timeout_s: float = 10.0,
                 handshake_timeout_s: float = 2.0, progress_mode: str = "thread") -> None:
        if progress_mode not in PROGRESS_MODES:
            raise ValueError(f"ucx transport: progress_mode must be one of {', '.join(PROGRESS_MODES)}, "
                             f"got {progress_mode!r}")
        import_ucxx()  # fails here, with a clear message, rather than at the first connect
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"ucx transport: device must be cpu or cuda, got {device!r}")
        self.progress_mode = progress_mode
        self.ucx_tls = ucx_tls
        self.connect_timeout_s = connect_timeout_s
        # ucxx's tag exchange after the connection is made takes milliseconds with a live listener; to a port
        # where nothing listens, UCX sometimes reports nothing and only this bound ends the attempt.
        self.handshake_timeout_s = min(handshake_timeout_s, connect_timeout_s)

    async def listen(self, address: str) -> Listener:
        _, port = _parse_address(address)  # UCX listens on every interface; the host names the one peers use
        context = acquire_context(ucx_options(self.device, self.ucx_tls), self.progress_mode)
        try:
            return UcxListener(context, address, port, self.device)
        except BaseException:
            release_context(context)
            raise

    async def connect(self, address: str) -> Connection:
        host, port = _parse_address(address)
        context = acquire_context(ucx_options(self.device, self.ucx_tls), self.progress_mode)
        try:
            endpoint = await asyncio.wait_for(
                context.ctx.create_endpoint(host, port, endpoint_error_handling=True,
                                            connect_timeout=self.handshake_timeout_s),
                self.connect_timeout_s)
        except Exception as exc:  # refused, unreachable, or no answer in time (asyncio's TimeoutError)
            release_context(context)
            raise TransportError(f"cannot connect to {address} (nothing listening, or no answer within "
                                 f"{self.handshake_timeout_s} s / {self.connect_timeout_s} s): {exc!r}") from exc
        except BaseException:
            release_context(context)
            raise
        return UcxConnection(endpoint, context, address, self.device)
