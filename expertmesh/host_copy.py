"""Host -> device copies that do not wait for the device.

A copy from ordinary (pageable) host memory makes the host wait until the device's stream has drained, which on
a GPU serialises the host's launches with the device's work: the attention node's index tensors would stall it
several times per layer. Staged in pinned memory, the copy is queued like a kernel; torch's pinned-memory cache
keeps the staging buffer until the copy has run."""
from __future__ import annotations

import torch


def to_device(values: list[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """int64 tensor of `values` on `device` (a CPU tensor or list as given; on CUDA queued without a host wait)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
