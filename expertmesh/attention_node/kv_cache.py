"""The KV cache: per layer, one [slots, max_len, kv_heads, head_dim] tensor for keys and one for values.

A running sequence owns one slot for its whole life; slots are handed out and returned by the scheduler."""
from __future__ import annotations

import torch

from ..model.spec import ModelSpec


class KVCache:
    def __init__(self, spec: ModelSpec, num_slots: int, max_len: int, dtype: torch.dtype, device: str) -> None:
        shape = (num_slots, max_len, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.max_len = max_len
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache full: the scheduler admitted more sequences than slots")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)
