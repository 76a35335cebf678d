"""Host -> device copies that do not wait for the device.

A copy from ordinary (pageable) host memory makes the host wait until the device's stream has drained, which on
a GPU serialises the host's launches with the device's work: the attention node's index tensors would stall it
several times per layer. Staged in pinned memory, the copy is queued like a kernel; torch's pinned-memory cache
keeps the staging buffer until the copy has run. Several small tables go as one copy (to_device_all): each copy
costs the host a pinned allocation and a launch, about 10-20 µs, several times per step."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .transport.protocol import TensorMeta, packed_offsets, packed_views


def to_device(values: list[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """int64 tensor of `values` on `device` (a CPU tensor or list as given; on CUDA queued without a host wait)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_device_all(arrays: Sequence[np.ndarray | torch.Tensor | list[int]],
                  device: torch.device | str) -> list[torch.Tensor]:
    """to_device of each (a list becomes int64), in one copy: packed into one pinned staging buffer at 16-byte
    offsets, copied, and viewed back out of the device buffer. On a CPU device, the host tensors themselves."""
    tensors = [torch.from_numpy(a) if isinstance(a, np.ndarray) else
               a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.long) for a in arrays]
    if torch.device(device).type != "cuda":
        return tensors
    metas = [TensorMeta(t.dtype, tuple(t.shape)) for t in tensors]
    staging = torch.empty(packed_offsets(metas)[1], dtype=torch.uint8, pin_memory=True)
    for view, tensor in zip(packed_views(staging, metas), tensors):
        view.copy_(tensor)
    return packed_views(staging.to(device, non_blocking=True), metas)
