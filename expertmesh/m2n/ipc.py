"""Links over CUDA IPC between processes of one host (on one GPU — under MPS for concurrency — or several).

Each node allocates, for every peer, an inbound region: a receive slot per microbatch and one uint64 flag per slot. The
peer opens it by IPC handle (exchanged once, in the handshake) and sends by copying straight into the slot, then
writing the message's number into the slot's flag with a stream memory operation that follows the copy. The
receiver's stream waits on the device until the flag reaches that number: `wait="spin"` runs a one-warp kernel that
polls the flag (it sees the write within a microsecond, and needs the sender's work to run at the same time: two
GPUs, or MPS on one), `wait="memop"` a stream memory operation (no SM used, but the GPU front-end polls it at its
own pace). No host on the path, and no process waits for the other's host. A peer that dies leaves a wait pending: `release` lets it pass (from a
stream of its own) once the caller's deadline has gone by."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..transport.protocol import TensorMeta, packed_views
from . import cuda_driver as cu
from .links import Links

_RELEASED = 1 << 62  # a flag value no real message reaches
WAITS = ("spin", "memop")


@triton.jit(do_not_specialize=["target"])
def _spin_until(flag_ptr, target):
    seen = tl.load(flag_ptr, volatile=True)
    while seen < target:
        seen = tl.load(flag_ptr, volatile=True)


class IpcLinks(Links):
    backend = "ipc"

    def __init__(self, attention_nodes: int, rank: int, peers: list[int], microbatches: int, slot_bytes: int,
                 device: str, timeout_s: float, wait: str = "spin") -> None:
        super().__init__(attention_nodes, microbatches, slot_bytes)
        if wait not in WAITS:
            raise ValueError(f"ipc wait {wait!r}; choose one of {WAITS}")
        self.wait_kind = wait
        slots = microbatches
        if torch.device(device).type != "cuda":
            raise ValueError(f"ipc links connect CUDA devices, not {device}")
        self.rank = rank
        self.device = device
        self.timeout_s = timeout_s
        torch.empty(1, device=device)  # the device's primary context is current on this thread before driver calls
        self.slot_bytes = -(-slot_bytes // 256) * 256  # slots and flags stay aligned
        self.region_bytes = slots * self.slot_bytes + 8 * slots
        self._inbound = {peer: cu.mem_alloc(self.region_bytes) for peer in peers}
        self._inbound_slots = {peer: self._slot_tensors(ptr) for peer, ptr in self._inbound.items()}
        for ptr in self._inbound.values():
            cu.tensor_at(ptr, self.region_bytes, device)[slots * self.slot_bytes:].zero_()
        torch.cuda.synchronize(device)  # flags are zero before a peer can write them
        self._outbound: dict[int, int] = {}  # peer -> its inbound region for us, opened by handle
        self._outbound_slots: dict[int, list[torch.Tensor]] = {}
        self._flag_tensors: dict[int, torch.Tensor] = {}
        self._release_stream = 0

    def region_handle(self, peer: int) -> bytes:
        """The IPC handle of this node's inbound region for `peer` (sent to it in the handshake)."""
        return cu.ipc_handle(self._inbound[peer])

    def attach(self, peer: int, handle: bytes) -> None:
        """Opens `peer`'s inbound region for this node, from the handle it sent."""
        if len(handle) != 64:
            raise ValueError(f"rank {peer} sent an IPC handle of {len(handle)} bytes, not 64: is it on ipc links?")
        self._outbound[peer] = cu.ipc_open(handle)
        self._outbound_slots[peer] = self._slot_tensors(self._outbound[peer])

    def _slot_tensors(self, base: int) -> list[torch.Tensor]:
        return [cu.tensor_at(base + mb * self.slot_bytes, self.slot_bytes, self.device)
                for mb in range(self.microbatches)]

    def _flag(self, base: int, microbatch: int) -> int:
        """The address of the microbatch slot's flag in the region at base."""
        return base + self.microbatches * self.slot_bytes + 8 * microbatch

    def send(self, microbatch: int, peer: int, tensors: Sequence[torch.Tensor]) -> list:
        metas = [TensorMeta(t.dtype, tuple(t.shape)) for t in tensors]
        k = self._next(self._sent, peer, microbatch, metas)
        if peer not in self._outbound:
            raise RuntimeError(f"no ipc link to rank {peer}: the handshake did not attach it")
        for view, tensor in zip(packed_views(self._outbound_slots[peer][microbatch], metas), tensors):
            view.copy_(tensor)
        cu.stream_write_value(torch.cuda.current_stream(self.device).cuda_stream,
                              self._flag(self._outbound[peer], microbatch), k + 1)
        return []  # the copy is stream-ordered: later work on this stream may change the tensors

    def receive(self, microbatch: int, peer: int, metas: Sequence[TensorMeta]) -> tuple[list[torch.Tensor], list]:
        k = self._next(self._received, peer, microbatch, metas)
        return (packed_views(self._inbound_slots[peer][microbatch], metas),
                [(self._flag(self._inbound[peer], microbatch), k + 1)])

    async def wait(self, works: list) -> None:
        if self.wait_kind == "spin":
            for flag, value in works:
                _spin_until[(1,)](self._flag_tensor(flag), value, num_warps=1)
            return
        stream = torch.cuda.current_stream(self.device).cuda_stream
        for flag, value in works:
            cu.stream_wait_value(stream, flag, value)

    def _flag_tensor(self, address: int) -> torch.Tensor:
        tensor = self._flag_tensors.get(address)
        if tensor is None:
            tensor = self._flag_tensors[address] = cu.tensor_at(address, 8, self.device).view(torch.int64)
        return tensor

    def release(self) -> None:
        if not self._release_stream:
            self._release_stream = cu.stream_create_non_blocking()  # not behind the stuck waits
        for base in self._inbound.values():
            for mb in range(self.microbatches):
                cu.stream_write_value(self._release_stream, self._flag(base, mb), _RELEASED)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        for ptr in self._outbound.values():
            cu.ipc_close(ptr)
        for ptr in self._inbound.values():
            cu.mem_free(ptr)
        self._outbound.clear()
        self._inbound.clear()
        self._outbound_slots.clear()
        self._inbound_slots.clear()
