"""CUDA-graph helpers shared by both kinds of node: the batch-size buckets graphs are captured for, and the
capture of one call (warmed up on a side stream first, so that compilation and workspace allocation stay out)."""
from __future__ import annotations

from typing import Callable

import torch


def bucket_sizes(largest: int) -> list[int]:
    """1, 2, 4, 8, 12, 16, 24, 32, 48, ... (powers of two and the halfway points), ending at `largest`: at most a
    third of a replay is padding."""
    sizes, power = [1, 2, 4], 8
    while power < largest:
        sizes += [power, power * 3 // 2]
        power *= 2
    return sorted({s for s in sizes if s < largest} | {largest})


def capture(fn: Callable[[], object], pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, outputs) of fn captured into the memory pool `pool`; outputs are the static tensors replays fill."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph, outputs
