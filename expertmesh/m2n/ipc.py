"""Links over CUDA IPC between processes of one host (on one GPU — under MPS for concurrency — or several).

Each node allocates, for every peer, an inbound region: a receive slot per microbatch and one uint64 flag per slot.
The peer opens it by IPC handle (exchanged once, in the handshake) and sends by copying straight into the slot, then
adding one to the slot's flag with a one-thread kernel that follows the copies on its stream (copy="sm": one
kernel does both, ipc_copy.py). The receiver keeps, on the device, how many messages it has taken from each slot;
its wait is a one-warp kernel that counts one more and polls the flag until it gets there. Every number lives on
the device, so sends and waits can be captured in CUDA graphs and replayed for ever; no host is on the path, and no
process waits for the other's host. The polling kernel needs the sender's work to run at the same time as it: two
GPUs, or MPS on one. A peer that dies leaves a wait polling: `release` lets it pass (from a stream of its own) once
the caller's deadline has gone by."""
from __future__ import annotations

import time
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..config import IPC_COPIES
from ..transport.protocol import TensorMeta, packed_offsets, packed_views
from . import cuda_driver as cu
from . import ipc_copy
from .links import Links

_RELEASED = 1 << 62  # a flag value no real message count reaches


# A slot's flag and count lie 8 bytes apart per microbatch: not specialized on alignment, one variant serves every
# slot (a variant first loaded beside a pending wait would wait for the device to drain)
@triton.jit(do_not_specialize_on_alignment=["flag_ptr"])
def _signal(flag_ptr):
    """One more message in the slot (its copies precede this kernel on the stream). A release at system scope: on
    another GPU the flag is reached over NVLink, and the receiver must see the copies once it sees the count."""
    tl.atomic_add(flag_ptr, 1, sem="release", scope="sys")


@triton.jit(do_not_specialize_on_alignment=["flag_ptr", "taken_ptr"])
def _wait(flag_ptr, taken_ptr):
    """Counts one more message taken from the slot and polls its flag until the sender has signalled it."""
    target = tl.load(taken_ptr) + 1
    seen = tl.load(flag_ptr, volatile=True)
    while seen < target:
        seen = tl.load(flag_ptr, volatile=True)
    tl.store(taken_ptr, target)


class IpcLinks(Links):
    backend = "ipc"
    device_ordered = True

    def __init__(self, attention_nodes: int, rank: int, peers: list[int], microbatches: int, slot_bytes: int,
                 device: str, timeout_s: float, copy: str = "engine") -> None:
        """copy: who moves a send's bytes, "engine" (the driver's copies, then a signal kernel) or "sm" (one kernel
        copies and signals: ipc_copy.py)."""
        super().__init__(attention_nodes, microbatches, slot_bytes)
        if torch.device(device).type != "cuda":
            raise ValueError(f"ipc links connect CUDA devices, not {device}")
        if copy not in IPC_COPIES:
            raise ValueError(f"ipc links copy with one of {IPC_COPIES}, not {copy!r}")
        self.copy = copy
        self.rank = rank
        self.device = device
        self.timeout_s = timeout_s
        self.slot_bytes = -(-slot_bytes // 256) * 256  # slots and flags stay aligned
        self.region_bytes = microbatches * self.slot_bytes + 8 * microbatches
        with torch.cuda.device(device):  # driver calls act on the current context: this device's primary one
            self._inbound = {peer: cu.mem_alloc(self.region_bytes) for peer in peers}
        self._inbound_slots = {peer: self._slot_tensors(ptr) for peer, ptr in self._inbound.items()}
        self._inbound_flags = {peer: self._flags(ptr) for peer, ptr in self._inbound.items()}
        for flags in self._inbound_flags.values():
            flags.zero_()
        # messages taken from each inbound slot: the wait kernels' own count
        self._taken = {peer: torch.zeros(microbatches, dtype=torch.int64, device=device) for peer in peers}
        # peer -> its inbound region for us, opened by handle: raw addresses (on another GPU it is no tensor here)
        self._outbound: dict[int, int] = {}
        self._release_stream = 0
        # messages sent to each peer's slot and not yet wholly landed: the send kernel's arrival counts (copy="sm")
        self._arrived = {peer: torch.zeros(microbatches, dtype=torch.int32, device=device)
                         for peer in (peers if copy == "sm" else ())}
        scratch = torch.zeros(2, dtype=torch.int64, device=device)
        _signal[(1,)](scratch[0:1], num_warps=1)  # compiled now: graph capture must not meet a first launch
        _wait[(1,)](scratch[0:1], scratch[1:2], num_warps=1)
        if copy == "sm":
            word = torch.zeros(4, dtype=torch.int32, device=device)
            ipc_copy.send(word, [0], [word[:1]], scratch[0:1], word[3:])
        torch.cuda.synchronize(device)  # flags are zero before a peer can write them

    def _slot_tensors(self, base: int) -> list[torch.Tensor]:
        return [cu.tensor_at(base + mb * self.slot_bytes, self.slot_bytes, self.device)
                for mb in range(self.microbatches)]

    def _flag_offset(self, microbatch: int = 0) -> int:
        """Where a region's flag of `microbatch` lies: past the slots, one int64 per microbatch."""
        return self.microbatches * self.slot_bytes + 8 * microbatch

    def _flags(self, base: int) -> torch.Tensor:
        """The region's flags, one int64 per microbatch slot."""
        return cu.tensor_at(base + self._flag_offset(), 8 * self.microbatches, self.device).view(torch.int64)

    def region_handle(self, peer: int) -> bytes:
        """The IPC handle of this node's inbound region for `peer` (sent to it in the handshake)."""
        return cu.ipc_handle(self._inbound[peer])

    def attach(self, peer: int, handle: bytes) -> None:
        """Opens `peer`'s inbound region for this node, from the handle it sent."""
        if len(handle) != 64:
            raise ValueError(f"rank {peer} sent an IPC handle of {len(handle)} bytes, not 64: is it on ipc links?")
        with torch.cuda.device(self.device):  # mapped into this device's context (peer access enabled lazily)
            self._outbound[peer] = cu.ipc_open(handle)

    def send(self, microbatch: int, peer: int, tensors: Sequence[torch.Tensor]) -> list:
        metas = [TensorMeta(t.dtype, tuple(t.shape)) for t in tensors]
        self._check(peer, microbatch, metas)
        if peer not in self._outbound:
            raise RuntimeError(f"no ipc link to rank {peer}: the handshake did not attach it")
        slot = self._outbound[peer] + microbatch * self.slot_bytes
        flag = self._outbound[peer] + self._flag_offset(microbatch)
        offsets = packed_offsets(metas)[0]
        words = [ipc_copy.words_of(t) for t in tensors] if self.copy == "sm" else [None]
        if all(w is not None for w in words):
            ipc_copy.send(cu.DevicePointer(slot, torch.int32), offsets, words, cu.DevicePointer(flag, torch.int64),
                          self._arrived[peer][microbatch:microbatch + 1])
            return []
        stream = torch.cuda.current_stream(self.device).cuda_stream
        for offset, tensor in zip(offsets, tensors):
            if tensor.numel():
                tensor = tensor.contiguous()  # a temporary's memory is reused only by work after the copy
                cu.memcpy_async(slot + offset, tensor.data_ptr(), tensor.nbytes, stream)
        _signal[(1,)](cu.DevicePointer(flag, torch.int64), num_warps=1)
        return []  # the copies are stream-ordered: later work on this stream may change the tensors

    def receive(self, microbatch: int, peer: int, metas: Sequence[TensorMeta]) -> tuple[list[torch.Tensor], list]:
        self._check(peer, microbatch, metas)
        return (packed_views(self._inbound_slots[peer][microbatch], metas),
                [(self._inbound_flags[peer][microbatch:microbatch + 1], self._taken[peer][microbatch:microbatch + 1])])

    def enqueue_wait(self, works: list) -> None:
        for flag, taken in works:
            _wait[(1,)](flag, taken, num_warps=1)

    async def wait(self, works: list) -> None:
        self.enqueue_wait(works)

    def progress(self, timeout_s: float = 2.0) -> str:
        """Each slot's counts, read on a stream of its own (not behind the waits): messages signalled to this node
        and taken by its waits, and signalled by it to each peer. After a timeout, where the rounds stopped."""
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                counts = {f"from rank {p}": (self._inbound_flags[p].clone(), self._taken[p].clone())
                          for p in self._inbound}
                for peer, base in self._outbound.items():
                    sent = torch.empty(self.microbatches, dtype=torch.int64, device=self.device)
                    cu.memcpy_async(sent.data_ptr(), base + self._flag_offset(), sent.nbytes, stream.cuda_stream)
                    counts[f"to rank {peer}"] = (sent,)
                host = {k: [t.to("cpu", non_blocking=True) for t in v] for k, v in counts.items()}
                done = torch.cuda.Event()
                done.record(stream)
        deadline = time.monotonic() + timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                return "ipc slot counts unreadable (the device did not answer)"
            time.sleep(0.001)
        names = (["signalled", "taken"], ["signalled"])
        return "; ".join(f"{k}: " + ", ".join(f"{n} {t.tolist()}" for n, t in zip(names[len(v) == 1], v))
                         for k, v in host.items())

    def release(self) -> None:
        with torch.cuda.device(self.device):
            if not self._release_stream:
                self._release_stream = cu.stream_create_non_blocking()  # not behind the stuck waits
            for flags in self._inbound_flags.values():
                for mb in range(self.microbatches):
                    cu.stream_write_value(self._release_stream, flags.data_ptr() + 8 * mb, _RELEASED)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        with torch.cuda.device(self.device):
            for ptr in self._outbound.values():
                cu.ipc_close(ptr)
            for ptr in self._inbound.values():
                cu.mem_free(ptr)
        self._outbound.clear()
        self._inbound.clear()
        self._inbound_slots.clear()
