"""CUDA-graph helpers shared by both kinds of node: the batch-size buckets graphs are captured for, the sizes that
warm up every Triton kernel variant before serving, and the capture of one call (warmed up on a side stream first, so that compilation and workspace allocation stay out)."""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch

if TYPE_CHECKING:
    from .model.spec import ModelSpec


def bucket_sizes(largest: int) -> list[int]:
    """1, 2, 4, 8, 12, 16, 24, 32, 48, ... (powers of two and the halfway points), ending at `largest`: at most a
    third of a replay is padding."""
    sizes, power = [1, 2, 4], 8
    while power < largest:
        sizes += [power, power * 3 // 2]
        power *= 2
    return sorted({s for s in sizes if s < largest} | {largest})


def warm_up_sizes(limit: int) -> list[int]:
    """2, 3, 4, 5, 8, 9, 16, 17, ... up to limit: every power of two and one more, since Triton compiles a kernel
    apart for integer arguments divisible by 16 and for the others (and tile choices change at powers of two)."""
    sizes, power = [], 2
    while power <= limit:
        sizes += [power] + ([power + 1] if power + 1 <= limit else [])
        power *= 2
    return sizes


def split_counts(tokens: list[int], count: int) -> list[int]:
    """Sizes of contiguous groups of roughly equal token counts over items of `tokens` tokens; never an empty group.
    How an attention node splits a step into microbatches (model_runner.split_microbatches)."""
    count = max(1, min(count, len(tokens)))
    target = sum(tokens) / count
    sizes, filled = [0], 0
    for n in tokens:
        if sizes[-1] and filled >= target * len(sizes) and len(sizes) < count:
            sizes.append(0)
        sizes[-1] += 1
        filled += n
    return sizes


def decode_step_shape(sequences: int, microbatches: int, sizes: list[int]) -> tuple[int, ...]:
    """The microbatches of a decode step over `sequences`, each padded to its bucket in `sizes`: what a whole-step
    graph is captured for on both sides of the lockstep M2N."""
    return tuple(next(b for b in sizes if b >= n) for n in split_counts([1] * sequences, microbatches))


def decode_step_shapes(max_num_seqs: int, microbatches: int) -> list[tuple[int, ...]]:
    sizes = bucket_sizes(max_num_seqs)
    return sorted({decode_step_shape(n, microbatches, sizes) for n in range(1, max_num_seqs + 1)})


def prefill_bucket(tokens: int, limit: int) -> int | None:
    """The token bucket a step that carries prompt tokens is padded to (bucket_sizes up to `limit`, engine
    .prefill_graph_tokens), or None when it feeds more than `limit` tokens and runs eagerly."""
    return next((b for b in bucket_sizes(limit) if b >= tokens), None) if limit >= 2 else None


def prefill_graph_limit(limit: int, spec: "ModelSpec") -> int:
    """The most tokens of a step with prompts that replays a graph, for this model, on both kinds of node: none for
    MLA models, whose prefill attention loops over sequences on the host (ops/mla.py)."""
    return 0 if spec.mla is not None else limit


def prefill_step_shapes(limit: int, microbatches: int) -> list[tuple[int, ...]]:
    """The shapes of the whole-step graphs of steps that carry prompt tokens: each of its g microbatches padded to
    the bucket of the largest, for g = 1 .. microbatches (a step of few sequences has fewer groups)."""
    if limit < 2:
        return []
    return [(b,) * g for g in range(1, microbatches + 1) for b in bucket_sizes(limit) if b >= 2]


def step_graph_shapes(max_num_seqs: int, microbatches: int, prefill_tokens: int) -> list[tuple[int, ...]]:
    """Every shape (tokens per microbatch) of a whole step an attention node replays as one graph: what the expert
    nodes capture ahead, the same steps seen from their side."""
    return sorted(set(decode_step_shapes(max_num_seqs, microbatches))
                  | set(prefill_step_shapes(prefill_tokens, microbatches)))


def capture(fn: Callable[[], object], pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, outputs) of fn captured into the memory pool `pool`; outputs are the static tensors replays fill."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capturing(graph, pool):
        outputs = fn()
    return graph, outputs


@contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool) -> Iterator[None]:
    """torch.cuda.graph with the garbage collector off: a collection inside a capture that frees an older graph (an
    earlier runner's: two clusters in one test process) resets it, which a capturing stream does not permit, and the
    capture fails (seen on the H200: "operation not permitted when stream is capturing (function reset)")."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            yield
    finally:
        if enabled:
            gc.enable()
