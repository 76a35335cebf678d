"""Spans timed by the GPU's own clock, for work captured in CUDA graphs (telemetry.GpuMeter): CUDA events recorded
in a graph are overwritten by every replay, so a span instead captures two one-thread kernels that read the
global timer (%globaltimer, ns) and add the span's length and a count to counters on the device. Each span keeps its
slot's last start and end, so a trace can show where the last replay of each span ran (GpuMeter.timeline)."""
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
def _span_end_kernel(marks, ends, slot, totals):
    now = _now()
    tl.store(ends + slot, now)
    tl.atomic_add(totals, now - tl.load(marks + slot))
    tl.atomic_add(totals + 1, 1)


@triton.jit
def _now_kernel(out):
    tl.store(out, _now())


def span_start(marks: torch.Tensor, slot: int) -> None:
    """marks[slot] = now, when the current stream reaches this point."""
    _span_start_kernel[(1,)](marks, slot, num_warps=1)


def span_end(marks: torch.Tensor, ends: torch.Tensor, slot: int, totals: torch.Tensor) -> None:
    """ends[slot] = now; totals += (now - marks[slot], 1): int64 [busy ns, spans]."""
    _span_end_kernel[(1,)](marks, ends, slot, totals, num_warps=1)


def device_now(out: torch.Tensor) -> None:
    """out[0] = the global timer, when the current stream reaches this point."""
    _now_kernel[(1,)](out, num_warps=1)
