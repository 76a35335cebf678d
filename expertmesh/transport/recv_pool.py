"""Receive memory reused across messages, for transports that allocate it themselves (ucx)."""
from __future__ import annotations

import torch

from .protocol import Message, TensorMeta, packed_views

POOLED_MAX_BYTES = 64 << 20  # larger receive buffers are allocated per message (rare, bandwidth-bound anyway)
POOLED_PER_SIZE = 8


class ReceivePool:
    """Receive memory reused across messages: M2N traffic brings the same few sizes at every layer and step, and a
    fresh CPU allocation of a large tensor costs page faults every time. Sizes round up to powers of two; memory
    comes back through recycle() and a few buffers of each size up to POOLED_MAX_BYTES are kept."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._free: dict[int, list[torch.Tensor]] = {}

    def empty(self, meta: TensorMeta) -> torch.Tensor:
        size = 1 << max(0, meta.nbytes - 1).bit_length()
        if size > POOLED_MAX_BYTES:
            return torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        free = self._free.get(size)
        flat = free.pop() if free else torch.empty(size, dtype=torch.uint8, device=self.device)
        return packed_views(flat, [meta])[0]

    def give_back_message(self, message: Message) -> None:
        storages = {t.untyped_storage().data_ptr(): t for t in message.tensors()}  # packed tensors share one
        for tensor in storages.values():
            self.give_back(tensor)

    def give_back(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        if size == 0 or size & (size - 1) or size > POOLED_MAX_BYTES or tensor.device != self.device:
            return  # not from this pool
        free = self._free.setdefault(size, [])
        if len(free) < POOLED_PER_SIZE:
            free.append(torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage))
