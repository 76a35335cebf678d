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

from .transport.protocol import PACK_ALIGN, TensorMeta, packed_offsets, packed_views


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
    if torch.device(device).type != "cuda":
        return [torch.from_numpy(a) if isinstance(a, np.ndarray) else
                a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.long) for a in arrays]
    return to_device_buffer(arrays, device)[1]


def to_device_buffer(arrays: Sequence[np.ndarray | torch.Tensor | list[int]],
                     device: torch.device | str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """to_device_all, with the one buffer the tensors view (on a CPU device too): copy_into refills it in place."""
    host = _host_arrays(arrays)
    metas = [TensorMeta(torch.from_numpy(a[:0]).dtype, a.shape) for a in host]
    buffer = torch.empty(packed_offsets(metas)[1], dtype=torch.uint8, device=device)
    _copy(host, buffer)
    return buffer, packed_views(buffer, metas)


def copy_into(arrays: Sequence[np.ndarray | torch.Tensor | list[int]], buffer: torch.Tensor) -> None:
    """Queues the copy of `arrays` into `buffer`, a buffer of to_device_buffer for arrays of the same dtypes and
    shapes: on CUDA one pinned staging buffer and one copy, no host wait (a CUDA graph's static inputs)."""
    _copy(_host_arrays(arrays), buffer)


def _host_arrays(arrays: Sequence[np.ndarray | torch.Tensor | list[int]]) -> list[np.ndarray]:
    return [a if isinstance(a, np.ndarray) else a.numpy() if isinstance(a, torch.Tensor) else
            np.asarray(a, dtype=np.int64) for a in arrays]


def _copy(host: list[np.ndarray], buffer: torch.Tensor) -> None:
    on_cuda = buffer.device.type == "cuda"
    staging = torch.empty(buffer.numel(), dtype=torch.uint8, pin_memory=True) if on_cuda else buffer
    packed = staging.numpy()  # numpy views: a copy costs the host a microsecond, a torch op several
    start = 0
    for a in host:
        start += -start % PACK_ALIGN
        if start + a.nbytes <= packed.size:
            packed[start:start + a.nbytes].view(a.dtype)[:] = a.reshape(-1)
        start += a.nbytes
    if start != packed.size:
        raise ValueError(f"arrays of {[x.shape for x in host]} are not laid out as the {packed.size}-byte buffer")
    if on_cuda:
        buffer.copy_(staging, non_blocking=True)
