"""CUDA graphs of decode steps: each segment of the forward (the layers between two MoE points) captured once
per microbatch and batch-size bucket, and replayed with the step's inputs copied into its static buffers.

A decode step of n sequences runs as the smallest bucket >= n: padding sequences have no context and padding
tokens write nothing to the cache (kv/metadata.py), and only the first n rows go to the experts. Prefill and
mixed steps run eagerly, as vLLM does. Buckets and microbatches each get their own buffers, so microbatches in
flight at once never share one."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from ..cuda_graph import bucket_sizes, capture, decode_step_shape, decode_step_shapes

if TYPE_CHECKING:
    from .model_runner import ModelRunner
    from .scheduler import Sequence

log = logging.getLogger(__name__)


class GraphSet:
    """The graphs of one (microbatch, bucket): one per segment, chained through static tensors."""

    def __init__(self, runner: "ModelRunner", size: int, table_width: int) -> None:
        self.runner, self.size, self.table_width = runner, size, table_width
        self.token_ids, self.meta, self.last_token = runner.step_inputs([], pad_to=size, table_width=table_width)
        # the graphs must not depend on the step's longest context: attention kernels size their work from this bound
        self.meta.max_query_len, self.meta.max_seq_len = 1, runner.context_len
        self.moe_out = torch.zeros(size, runner.spec.hidden_size, dtype=runner.weights.embed_tokens.dtype,
                                   device=runner.device)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[tuple[torch.Tensor, ...]] = []

    def capture(self, pool) -> None:
        runner = self.runner
        for j in range(len(runner.moe_points) + 1):
            h = self.token_ids if j == 0 else self.outputs[j - 1][0]
            graph, outputs = capture(lambda: runner.segment(j, h, self.moe_out, self.meta, self.last_token), pool)
            self.graphs.append(graph)
            self.outputs.append(outputs)

    def load(self, seqs: list["Sequence"]) -> None:
        """The step's inputs (padded to the bucket) into the static buffers; device copies, no host wait."""
        token_ids, meta, _ = self.runner.step_inputs(seqs, pad_to=self.size, table_width=self.table_width)
        self.token_ids.copy_(token_ids, non_blocking=True)
        for name in ("block_table", "slot_mapping", "seq_lens", "query_start", "positions"):
            getattr(self.meta, name).copy_(getattr(meta, name), non_blocking=True)

    def replay(self, j: int) -> tuple[torch.Tensor, ...]:
        self.graphs[j].replay()
        return self.outputs[j]

    def set_moe_out(self, moe_out: torch.Tensor) -> None:
        self.moe_out[:moe_out.shape[0]].copy_(moe_out)


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", max_num_seqs: int, microbatches: int) -> None:
        self.runner = runner
        self.sizes = bucket_sizes(max_num_seqs)
        block_size = runner.kv_cache.block_size
        self.table_width = -(-runner.context_len // block_size)
        self.sets = {(mb, size): GraphSet(runner, size, self.table_width)
                     for mb in range(microbatches) for size in self.sizes}

    def capture(self, progress=None) -> None:
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for (mb, size) in sorted(self.sets, key=lambda key: -key[1]):  # largest first: the pool fits them all
                self.sets[(mb, size)].capture(pool)
        torch.cuda.synchronize()
        log.info("captured %d CUDA graphs (%d buckets up to %d sequences, %d segments) in %.1f s",
                 sum(len(s.graphs) for s in self.sets.values()), len(self.sizes), self.sizes[-1],
                 len(self.runner.moe_points) + 1, time.monotonic() - started)

    def ready_for(self, microbatch: int, seqs: list["Sequence"]) -> GraphSet | None:
        """The graphs for a decode step over seqs, or None where the step must run eagerly (prefill, too large)."""
        if not seqs or len(seqs) > self.sizes[-1] or any(s.num_tokens - s.num_cached != 1 for s in seqs):
            return None
        size = next(s for s in self.sizes if s >= len(seqs))
        return self.sets.get((microbatch, size))


class StepGraphs:
    """Whole decode steps over the lockstep M2N as one CUDA graph each (device-ordered links whose sends and waits
    keep their counts on the device: ipc): every microbatch's segments and M2N rounds in the ping-pong order the
    coroutines would enqueue them, keyed by the microbatches' buckets. A step's host work is then one replay,
    whatever the layers and microbatches. The expert nodes get each microbatch padded to its bucket (padding rows
    compute, and their answers are dropped)."""

    def __init__(self, runner: "ModelRunner", max_num_seqs: int, microbatches: int) -> None:
        self.runner, self.microbatches = runner, microbatches
        self.sizes = bucket_sizes(max_num_seqs)
        self.table_width = -(-runner.context_len // runner.kv_cache.block_size)
        self.keys = decode_step_shapes(max_num_seqs, microbatches)
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, list[GraphSet], list[torch.Tensor]]] = {}

    def capture(self) -> None:
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for key in sorted(self.keys, key=lambda k: -sum(k)):  # largest first: the pool fits them all
                sets = [GraphSet(self.runner, size, self.table_width) for size in key]
                graph = torch.cuda.CUDAGraph()
                # no eager run first (capture's usual warm-up): it would send real rounds; the kernels have run
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._step(sets)
                self.graphs[key] = (graph, sets, logits)
        torch.cuda.synchronize()
        log.info("captured %d whole-step CUDA graphs (decode, M2N rounds inside) in %.1f s", len(self.graphs),
                 time.monotonic() - started)

    def _step(self, sets: list[GraphSet]) -> list[torch.Tensor]:
        runner, m2n = self.runner, self.runner.experts
        dtype = runner.weights.embed_tokens.dtype
        states, handles, logits = [None] * len(sets), [None] * len(sets), [None] * len(sets)
        for j in range(len(runner.moe_points) + 1):
            for mb, s in enumerate(sets):  # ping-pong: microbatch mb's attention runs while mb - 1 is at the experts
                moe_out = None if j == 0 else m2n.enqueue_combine(handles[mb], dtype)
                with runner.gpu.span():  # timed on the device at every replay (the M2N waits left out)
                    outputs = runner.segment(j, s.token_ids if j == 0 else states[mb], moe_out, s.meta,
                                             s.last_token)
                if j == len(runner.moe_points):
                    logits[mb] = outputs[0]
                    continue
                states[mb], x, expert_ids, expert_weights = outputs
                handles[mb] = m2n.enqueue_round(runner.moe_points[j], mb, x, expert_ids, expert_weights)
        return logits

    def ready_for(self, seqs: list["Sequence"]) -> tuple[int, ...] | None:
        """The key of a decode step over seqs, or None where it must run otherwise (prefill, too large)."""
        if not seqs or len(seqs) > self.sizes[-1] or any(s.num_tokens - s.num_cached != 1 for s in seqs):
            return None
        key = decode_step_shape(len(seqs), self.microbatches, self.sizes)
        return key if key in self.graphs else None

    def run(self, key: tuple[int, ...], groups: list[list["Sequence"]]) -> torch.Tensor:
        """Logits of the step's sequences (groups = its microbatches, as `key` splits them), in order."""
        graph, sets, logits = self.graphs[key]
        for s, group in zip(sets, groups):
            s.load(group)
        graph.replay()
        return torch.cat([out[:len(group)] for out, group in zip(logits, groups)])
