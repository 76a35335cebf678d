"""Links over UCX (ucxx): the lockstep M2N's fixed-capacity protocol between CPU processes, and over RDMA across
hosts where NCCL is not wanted (`--transport ucx-lockstep`; `ucx` stays the message M2N).

Each node's UCX worker address crosses in the handshake (Hello / HelloReply's `region`); each side opens an
endpoint to the other's worker from it, with error handling, so a peer that dies cancels what is posted to it.
A receive is a tag receive straight into the (peer, microbatch) slot, allocated once; its tag names the sender's
rank and the microbatch, and UCX matches the messages of one sender and tag in the order they were sent, as the
lockstep schedule wants. A send is a tag send from the caller's own memory (one per tensor, no staging copy). On
CUDA (ucxx moves device memory outside torch's streams) what a flush posts waits for the current stream's work
first; only CPU is tested here."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..transport.base import TransportError
from ..transport.protocol import TensorMeta, packed_views
from ..transport.ucx_context import PROGRESS_MODES, acquire_context, import_ucxx, release_context, ucx_options
from .links import Links

_TAG_BASE = 0x4C4B << 48  # keeps the links' tags apart from ucxx's random endpoint tags on a shared worker
_CLOSE_PERIOD_NS = 10**9


def _tag(sender_rank: int, microbatch: int) -> int:
    return _TAG_BASE | sender_rank << 16 | microbatch


def _wire(tensor: torch.Tensor) -> Any:
    """The tensor's bytes in its own memory: a numpy view on CPU (any dtype, bf16 included), the uint8 tensor on
    CUDA (ucxx reads __cuda_array_interface__)."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return flat.numpy() if flat.device.type == "cpu" else flat


@dataclass
class _Batch:
    """The operations of one flush: posted together, waited on together."""
    ops: list[tuple[str, int, Any, int]] = field(default_factory=list)  # ("send" | "recv", peer, buffer, tag)
    keep: list[torch.Tensor] = field(default_factory=list)  # what UCX reads or writes until the requests complete
    requests: list[tuple[int, Any]] = field(default_factory=list)  # (peer, ucxx request), once posted
    posting: asyncio.Task | None = None  # CUDA: posts the ops once the stream has passed the flush


class UcxLinks(Links):
    backend = "ucx"

    def __init__(self, attention_nodes: int, rank: int, peers: list[int], microbatches: int, slot_bytes: int,
                 device: str, timeout_s: float, progress_mode: str = "thread", ucx_tls: str | None = None) -> None:
        """Call inside the node's event loop: ucxx's context belongs to it (transport/ucx_context.py)."""
        super().__init__(attention_nodes, microbatches, slot_bytes)
        if progress_mode not in PROGRESS_MODES:
            raise ValueError(f"ucx links: progress_mode must be one of {', '.join(PROGRESS_MODES)}, "
                             f"got {progress_mode!r}")
        import_ucxx()
        from ucxx._lib.arr import Array
        from ucxx.types import Tag, TagMaskFull
        self._array, self._tag_type, self._tag_mask = Array, Tag, TagMaskFull
        self.rank = rank
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self._context = acquire_context(ucx_options(self.device, ucx_tls), progress_mode)
        self._slots = {(peer, mb): torch.empty(slot_bytes, dtype=torch.uint8, device=self.device)
                       for peer in peers for mb in range(microbatches)}
        self._endpoints: dict[int, Any] = {}
        self._batch = _Batch()
        self._last_posting: asyncio.Task | None = None  # CUDA: flushes post in order, each after the one before

    def region_handle(self, peer: int) -> bytes:
        """This node's UCX worker address: what `peer` opens its endpoint to us from."""
        return self._context.ctx.worker.address.tobytes()

    def attach(self, peer: int, handle: bytes) -> None:
        from ucxx._lib.libucxx import UCXAddress, UCXEndpoint
        if not handle:
            raise ValueError(f"rank {peer} sent no UCX worker address: is it on ucx-lockstep links?")
        if peer in self._endpoints:  # the same peer greeting again: the old endpoint goes
            self._close_endpoint(self._endpoints.pop(peer))
        self._endpoints[peer] = UCXEndpoint.create_from_worker_address(
            self._context.ctx.worker, UCXAddress.create_from_buffer(handle), True)

    def _endpoint(self, peer: int) -> Any:
        endpoint = self._endpoints.get(peer)
        if endpoint is None:
            raise RuntimeError(f"no ucx link to rank {peer}: the handshake did not attach it")
        return endpoint

    def send(self, microbatch: int, peer: int, tensors: Sequence[torch.Tensor]) -> list:
        self._check(peer, microbatch, [TensorMeta(t.dtype, tuple(t.shape)) for t in tensors])
        self._endpoint(peer)
        for tensor in tensors:
            if tensor.numel():
                tensor = tensor.contiguous()  # the caller's memory when it already is
                self._batch.keep.append(tensor)
                self._batch.ops.append(("send", peer, _wire(tensor), _tag(self.rank, microbatch)))
        return [self._batch]

    def receive(self, microbatch: int, peer: int, metas: Sequence[TensorMeta]) -> tuple[list[torch.Tensor], list]:
        self._check(peer, microbatch, metas)
        self._endpoint(peer)
        views = packed_views(self._slots[(peer, microbatch)], metas)
        for view in views:
            if view.numel():
                self._batch.ops.append(("recv", peer, _wire(view), _tag(peer, microbatch)))
        return views, [self._batch]

    def flush(self) -> None:
        batch, self._batch = self._batch, _Batch()
        if not batch.ops:
            return
        if self.device.type != "cuda":
            self._post(batch)
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        batch.posting = self._last_posting = asyncio.ensure_future(self._post_after(self._last_posting, event, batch))

    async def _post_after(self, previous: asyncio.Task | None, event: torch.cuda.Event, batch: _Batch) -> None:
        if previous is not None:
            await previous
        if not event.query():
            await asyncio.to_thread(event.synchronize)
        self._post(batch)

    def _post(self, batch: _Batch) -> None:
        """Posts the batch's operations in their order: UCX matches a sender's messages of one tag in posting order."""
        for kind, peer, buffer, tag in batch.ops:
            endpoint = self._endpoints[peer]
            try:
                if kind == "send":
                    request = endpoint.tag_send(self._array(buffer), self._tag_type(tag))
                else:
                    request = endpoint.tag_recv(self._array(buffer), self._tag_type(tag), self._tag_mask)
            except Exception as exc:  # ucxx refuses to post on an endpoint that already failed
                raise self._failed(peer, exc) from None
            batch.requests.append((peer, request))

    def _failed(self, peer: int, exc: Exception) -> TransportError:
        return TransportError(f"ucx link between ranks {self.rank} and {peer} failed, the peer is gone or "
                              f"unreachable: {exc!r}")

    async def wait(self, works: list) -> None:
        """Until every request of the works' batches has completed, without blocking the event loop; TransportError
        when a peer's endpoint failed (UCX cancels its requests) or after timeout_s."""
        self.flush()
        batches = list({id(batch): batch for batch in works}.values())
        try:
            await asyncio.wait_for(self._complete(batches), self.timeout_s)
        except asyncio.TimeoutError:
            pending = sorted({peer for batch in batches for peer, request in batch.requests if not request.completed})
            raise TransportError(f"ucx links: rank {self.rank} got nothing from ranks {pending} within "
                                 f"{self.timeout_s} s: a peer is gone or stuck") from None
        for batch in batches:
            batch.keep.clear()

    async def _complete(self, batches: list[_Batch]) -> None:
        for batch in batches:
            if batch.posting is not None:
                await batch.posting
        for batch in batches:
            for peer, request in batch.requests:
                try:
                    if request.completed:
                        request.check_error()
                    else:
                        await request.wait()
                except Exception as exc:  # ucxx's errors: the endpoint failed, its requests were cancelled
                    raise self._failed(peer, exc) from None

    def _close_endpoint(self, endpoint: Any) -> None:
        endpoint.close_blocking(period=_CLOSE_PERIOD_NS, max_attempts=1)
        endpoint.remove_close_callback()

    def close(self) -> None:
        if self._context is None:
            return
        for endpoint in self._endpoints.values():
            self._close_endpoint(endpoint)
        self._endpoints.clear()
        self._slots.clear()
        release_context(self._context)
        self._context = None
