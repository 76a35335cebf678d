"""Spans timed by the GPU's own clock, for work captured in CUDA graphs (telemetry.GpuMeter): CUDA events recorded
in a graph are overwritten by every replay, so a span instead captures two one-thread kernels that read the
global timer (%globaltimer, ns) and add the span's length and a count to counters on the device."""
from __future__ import annotations

import torch

from .backend import tl, triton


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit(do_not_specialize=["slot"])
def _span_start_kernel(marks, slot):
    tl.store(marks + slot, _now())


@triton.jit(do_not_specialize=["slot"])
def _span_end_kernel(marks, slot, totals):
    tl.atomic_add(totals, _now() - tl.load(marks + slot))
    tl.atomic_add(totals + 1, 1)


def span_start(marks: torch.Tensor, slot: int) -> None:
    """marks[slot] = now, when the current stream reaches this point."""
    _span_start_kernel[(1,)](marks, slot, num_warps=1)


def span_end(marks: torch.Tensor, slot: int, totals: torch.Tensor) -> None:
    """totals += (now - marks[slot], 1): int64 [busy ns, spans]."""
    _span_end_kernel[(1,)](marks, slot, totals, num_warps=1)
