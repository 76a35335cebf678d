"""CUDA graphs of steps, captured once per microbatch and shape and replayed with the step's inputs copied into
their static buffers.

Two kinds of step replay graphs (vLLM's full graphs, for mixed batches too):
- decode steps, one new token per sequence: padded to a bucket of sequences, attention on the decode kernel;
- steps that carry prompt tokens (prefill chunks, alone or beside decodes) of up to engine.prefill_graph_tokens
  new tokens: padded to a bucket of tokens and a fixed number of sequence rows, attention on the kernel for any mix,
  sized from those bounds (default: every step within max_batch_tokens). Steps past the cap, steps that score prompt
  tokens (prompt logprobs) and, for MLA models, every step with prompts (its prefill attention loops on the host)
  run eagerly.
Padding sequences have no context and padding tokens write nothing to the cache (kv/metadata.py); their expert ids
are -1, so no expert computes them (ModelRunner.segment), and only real rows are sampled.

SegmentGraphs capture each segment (the layers between two MoE points) apart, for M2N rounds run by the host in
between; StepGraphs capture whole steps with their rounds, on links that keep their counts on the device (ipc)."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from ..cuda_graph import bucket_sizes, capture, capturing, decode_step_shape, decode_step_shapes, prefill_bucket, \
    prefill_step_shapes
from ..host_copy import copy_into, to_device_buffer
from ..kv.metadata import StepMetadata
from . import prompt_logprobs

if TYPE_CHECKING:
    from .model_runner import ModelRunner
    from .scheduler import Sequence

log = logging.getLogger(__name__)

DECODE, PREFILL = "decode", "prefill"


def new_tokens(seq: "Sequence") -> int:
    """Tokens seq feeds this step (len(seq.new_token_ids()), without building the list)."""
    uncached = seq.num_tokens - seq.num_cached
    return uncached if seq.num_new is None else min(seq.num_new, uncached)


def step_kind(seqs: list["Sequence"], max_decode: int) -> str | None:
    """DECODE (every sequence feeds one token, at most max_decode sequences), PREFILL (some feed more), or None:
    no sequences, or one whose step scores prompt tokens (prompt logprobs: graphs project each last row only)."""
    if not seqs or any(s.prompt_logprobs_n is not None and prompt_logprobs.positions(s) for s in seqs):
        return None
    if all(s.num_tokens - s.num_cached == 1 for s in seqs):
        return DECODE if len(seqs) <= max_decode else None
    return PREFILL


class GraphSet:
    """The graphs of one (microbatch, shape): one per segment, chained through static tensors. The shape: `seqs`
    sequence rows and `tokens` token rows (a decode set: one per sequence, on the decode kernel)."""

    def __init__(self, runner: "ModelRunner", seqs: int, tokens: int, table_width: int, prefill: bool) -> None:
        self.runner, self.seqs, self.tokens, self.table_width = runner, seqs, tokens, table_width
        self.kind = PREFILL if prefill else DECODE
        # the static inputs: views of one device buffer, which a step's load refills with one copy
        arrays, sizes, _ = runner.host_inputs([], pad_to=(seqs, tokens), table_width=table_width)
        self.inputs, (self.token_ids, self.last_token, self.held_from, *tables) = to_device_buffer(arrays,
                                                                                                   runner.device)
        self.meta = StepMetadata(*tables, *sizes)
        # the graphs must not depend on the step's lengths: attention kernels size their work from these bounds
        self.meta.max_query_len, self.meta.max_seq_len = (tokens if prefill else 1), runner.context_len
        self.rows = 0  # real tokens of the step loaded last
        self.moe_out = torch.zeros(tokens, runner.spec.hidden_size, dtype=runner.weights.embed_tokens.dtype,
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

    def warm_up(self) -> None:
        """Every segment once, eagerly, with zeros for the MoE outputs: each kernel variant of this shape compiled
        and loaded before a capture that records M2N rounds too (StepGraphs), which cannot warm up by a run."""
        h = self.token_ids
        for j in range(len(self.runner.moe_points) + 1):
            h = self.runner.segment(j, h, None if j == 0 else torch.zeros_like(self.moe_out), self.meta,
                                    self.last_token)[0]

    def load(self, seqs: list["Sequence"]) -> None:
        """The step's inputs (padded to the shape) into the static buffers; device copies, no host wait."""
        arrays, sizes, held = self.runner.host_inputs(seqs, pad_to=(self.seqs, self.tokens),
                                                      table_width=self.table_width)
        self.rows = sizes[-1]  # num_tokens
        copy_into(arrays, self.inputs)
        if held:
            self.token_ids.copy_(self.runner.held_in(self.token_ids, self.held_from))

    def replay(self, j: int) -> tuple[torch.Tensor, ...]:
        self.graphs[j].replay()
        return self.outputs[j]

    def set_moe_out(self, moe_out: torch.Tensor) -> None:
        self.moe_out[:moe_out.shape[0]].copy_(moe_out)


def _prefill_set(runner: "ModelRunner", bucket: int, max_decode: int, table_width: int) -> GraphSet:
    # a step of `bucket` tokens has at most that many sequences, and never more than a batch
    return GraphSet(runner, min(bucket, max_decode), bucket, table_width, prefill=True)


class SegmentGraphs:
    """Segment graphs of every (microbatch, kind, bucket). prefill_tokens > 0: steps that carry prompt tokens get
    graphs too (colocated, where a step is one segment; between MoE points each set would hold every segment's
    outputs)."""

    def __init__(self, runner: "ModelRunner", max_num_seqs: int, microbatches: int, prefill_tokens: int = 0) -> None:
        self.runner, self.prefill_tokens = runner, prefill_tokens
        self.sizes = bucket_sizes(max_num_seqs)
        self.table_width = -(-runner.context_len // runner.kv_cache.block_size)
        self.sets = {(mb, DECODE, size): GraphSet(runner, size, size, self.table_width, prefill=False)
                     for mb in range(microbatches) for size in self.sizes}
        self.sets |= {(mb, PREFILL, b): _prefill_set(runner, b, self.sizes[-1], self.table_width)
                      for mb in range(microbatches) for (b,) in prefill_step_shapes(prefill_tokens, 1)}

    def capture(self) -> None:
        started = time.monotonic()
        # A memory pool per microbatch. Graphs that share a pool may reuse each other's freed intermediates, which is
        # safe only when they replay in the order they were captured. Microbatches interleave their segments
        # (ping-pong): in one shared pool, microbatch 1's segment outputs, captured after microbatch 0's set, could sit
        # where microbatch 0's next segment keeps its intermediates, and be overwritten before they are read.
        pools = {mb: torch.cuda.graph_pool_handle() for mb, _, _ in self.sets}
        with torch.no_grad():
            for key in sorted(self.sets, key=lambda key: -self.sets[key].tokens):  # largest first: a pool fits all
                self.sets[key].capture(pools[key[0]])
        torch.cuda.synchronize()
        log.info("captured %d CUDA graphs (decode steps up to %d sequences, steps with prompts up to %d tokens, "
                 "%d segments) in %.1f s", sum(len(s.graphs) for s in self.sets.values()), self.sizes[-1],
                 self.prefill_tokens, len(self.runner.moe_points) + 1, time.monotonic() - started)

    def ready_for(self, microbatch: int, seqs: list["Sequence"]) -> GraphSet | None:
        """The graphs for a step over seqs, or None where the step must run eagerly."""
        kind = step_kind(seqs, self.sizes[-1])
        if kind == DECODE:
            return self.sets.get((microbatch, DECODE, next(s for s in self.sizes if s >= len(seqs))))
        if kind == PREFILL:
            bucket = prefill_bucket(sum(new_tokens(s) for s in seqs), self.prefill_tokens)
            return self.sets.get((microbatch, PREFILL, bucket))
        return None


class StepGraphs:
    """Whole steps over the lockstep M2N as one CUDA graph each (device-ordered links whose sends and waits keep
    their counts on the device: ipc): every microbatch's segments and M2N rounds in the ping-pong order the
    coroutines would enqueue them, keyed by kind and the microbatches' buckets. A step's host work is then one
    replay, whatever the layers and microbatches. The expert nodes get each microbatch padded to its bucket
    (`StepPlan.tokens`, the shape; padding rows carry expert id -1)."""

    def __init__(self, runner: "ModelRunner", max_num_seqs: int, microbatches: int, prefill_tokens: int = 0) -> None:
        self.runner, self.microbatches, self.prefill_tokens = runner, microbatches, prefill_tokens
        self.sizes = bucket_sizes(max_num_seqs)
        self.table_width = -(-runner.context_len // runner.kv_cache.block_size)
        self.keys = [(DECODE, shape) for shape in decode_step_shapes(max_num_seqs, microbatches)] + \
                    [(PREFILL, shape) for shape in prefill_step_shapes(prefill_tokens, microbatches)]
        self.graphs: dict[tuple[str, tuple[int, ...]],
                          tuple[torch.cuda.CUDAGraph, list[GraphSet], list[torch.Tensor]]] = {}

    def capture(self) -> None:
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for kind, shape in sorted(self.keys, key=lambda k: -sum(k[1])):  # largest first: the pool fits them all
                sets = [GraphSet(self.runner, size, size, self.table_width, prefill=False) if kind == DECODE else
                        _prefill_set(self.runner, size, self.sizes[-1], self.table_width) for size in shape]
                # not a warm-up by running the step (it would send real rounds): the segments alone, without rounds
                for s in {s.tokens: s for s in sets}.values():
                    s.warm_up()
                graph = torch.cuda.CUDAGraph()
                with capturing(graph, pool):
                    logits = self._step(sets)
                self.graphs[(kind, shape)] = (graph, sets, logits)
        torch.cuda.synchronize()
        log.info("captured %d whole-step CUDA graphs (M2N rounds inside; decode steps up to %d sequences, steps with "
                 "prompts up to %d tokens) in %.1f s", len(self.graphs), self.sizes[-1], self.prefill_tokens,
                 time.monotonic() - started)

    def _step(self, sets: list[GraphSet]) -> list[torch.Tensor]:
        runner, m2n = self.runner, self.runner.experts
        dtype = runner.weights.embed_tokens.dtype
        states, handles, logits = [None] * len(sets), [None] * len(sets), [None] * len(sets)
        for j in range(len(runner.moe_points) + 1):
            for mb, s in enumerate(sets):  # ping-pong: microbatch mb's attention runs while mb - 1 is at the experts
                moe_out = None if j == 0 else m2n.enqueue_combine(handles[mb], dtype)
                # timed at every replay (the M2N waits left out); the shape names the graph (gpu_timeline.py)
                with runner.gpu.span(f"segment {j}, {s.kind} {s.tokens}", mb):
                    outputs = runner.segment(j, s.token_ids if j == 0 else states[mb], moe_out, s.meta,
                                             s.last_token)
                if j == len(runner.moe_points):
                    logits[mb] = outputs[0]
                    continue
                states[mb], x, expert_ids, expert_weights = outputs
                handles[mb] = m2n.enqueue_round(runner.moe_points[j], mb, x, expert_ids, expert_weights)
        return logits

    def ready_for(self, seqs: list["Sequence"], groups: list[list["Sequence"]]) -> tuple[str, tuple[int, ...]] | None:
        """The key of a step over seqs split into `groups` (its microbatches), or None where it runs otherwise."""
        kind = step_kind(seqs, self.sizes[-1])
        if kind == DECODE:
            key = (DECODE, decode_step_shape(len(seqs), self.microbatches, self.sizes))
        elif kind == PREFILL:
            bucket = prefill_bucket(max(sum(new_tokens(s) for s in group) for group in groups), self.prefill_tokens)
            key = (PREFILL, (bucket,) * len(groups))
        else:
            return None
        return key if key in self.graphs else None

    def run(self, key: tuple[str, tuple[int, ...]], groups: list[list["Sequence"]]) -> torch.Tensor:
        """Logits of the step's sequences (groups = its microbatches, as `key` splits them), in order."""
        graph, sets, logits = self.graphs[key]
        for s, group in zip(sets, groups):
            s.load(group)
        graph.replay()
        return torch.cat([out[:len(group)] for out, group in zip(logits, groups)])
