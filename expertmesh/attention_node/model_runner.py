"""The attention node's forward pass: embed, then per layer attention here and the MoE at the expert nodes
(or, colocated, here too).

The layers between two MoE points form a *segment*: tensors in, tensors out, nothing that waits on the device,
so a step's segments can be captured as CUDA graphs (cuda_graphs.py) and replayed. A step's sequences
are split into microbatches that run as concurrent coroutines: while one waits for the expert nodes, the next
runs its attention (ping-pong)."""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import numpy as np
import torch

from ..cuda_graph import prefill_graph_limit, split_counts, warm_up_sizes
from ..host_copy import to_device, to_device_all
from ..kv.block_manager import BlockManager
from ..kv.cache import PagedKVCache
from ..kv.metadata import StepMetadata, step_tables
from ..model.layers import route_and_share, self_attention, swiglu
from ..model.rotary import RotaryTable
from ..model.spec import ModelSpec
from ..model.weights import AttentionSideWeights
from ..ops.fused_moe import StackedExperts, fused_moe
from ..ops.norm import add_rms_norm, rms_norm
from ..telemetry import GpuMeter, PhaseClock
from . import prompt_logprobs
from .cuda_graphs import GraphSet, SegmentGraphs, StepGraphs, new_tokens
from ..transport.protocol import SamplingParams
from .scheduler import PLACEHOLDER, Sequence

log = logging.getLogger(__name__)


class ExpertBackend(Protocol):
    """Where a MoE layer's experts run: the expert nodes over M2N (m2n/messages.py: messages; m2n/lockstep.py:
    lockstep rounds), or a stand-in."""

    async def begin_step(self, step: int, tokens: list[int]) -> None:
        """Before a step's first dispatch: the tokens of each of its microbatches."""

    async def end_step(self, step: int, event=None) -> None:
        """After its last: returns once the step's expert work is done (or raises); `event`, where given, was
        recorded on the device after the step's work (later work is not waited for)."""

    async def dispatch(self, step: int, layer: int, microbatch: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                       expert_weights: torch.Tensor): ...

    async def gather(self, handle): ...

    def reduce(self, handle, answers, like: torch.Tensor) -> torch.Tensor: ...


def split_microbatches(seqs: list[Sequence], count: int) -> list[list[Sequence]]:
    """Contiguous groups of roughly equal new-token counts; never an empty group."""
    groups, start = [], 0
    for size in split_counts([new_tokens(s) for s in seqs], count):
        groups.append(seqs[start:start + size])
        start += size
    return groups


class ModelRunner:
    """experts=None runs each MoE layer through `local_experts` (colocated mode: every layer's experts stacked here,
    no transport, so a decode step is one segment); otherwise the MoE layers go to `experts`."""

    def __init__(self, spec: ModelSpec, weights: AttentionSideWeights, kv_cache: PagedKVCache,
                 experts: ExpertBackend | None, device: str, local_experts: dict[int, StackedExperts] | None = None,
                 context_len: int | None = None, blocks: BlockManager | None = None) -> None:
        if (experts is None) == (local_experts is None):
            raise ValueError("give the runner either expert nodes (experts) or local_experts, not both or neither")
        self.spec = spec
        self.weights = weights
        self.kv_cache = kv_cache
        self.blocks = blocks  # the scheduler's: where the sequences' block tables are mirrored, for step_inputs
        self.experts = experts
        self.local_experts = local_experts
        self.device = device
        self.clock = PhaseClock()
        # async scheduling: the running step's sampled tokens on the device, and each of its sequences' row there
        self.held_tokens: tuple[torch.Tensor, dict[int, int]] | None = None
        self._step_ends: dict[int, torch.cuda.Event] = {}  # forward(end_step=False)'s steps, until finish_step
        self.gpu = GpuMeter(device)  # segments' device time
        self.context_len = context_len or spec.max_position_embeddings
        self.rotary = RotaryTable(spec.rope, spec.head_dim, self.context_len, weights.embed_tokens.dtype, device)
        # segment j ends at moe_points[j] (that layer's router outputs); the last segment ends with the logits
        self.moe_points = [] if local_experts is not None else spec.moe_layer_ids
        self.graphs: SegmentGraphs | None = None
        self.eager_steps = 0  # steps with a microbatch that replayed no graph
        self.step_graphs: StepGraphs | None = None

    def capture_graphs(self, max_num_seqs: int, microbatches: int, prefill_tokens: int = 0) -> None:
        """Decode steps of up to max_num_seqs sequences, and steps that carry prompt tokens of up to prefill_tokens
        new tokens, replay CUDA graphs from now on (CUDA only): whole steps with their M2N rounds over links that
        keep their counts on the device, else segment by segment (steps with prompts only colocated, where a step
        is one segment). Segment graphs are captured only where whole steps are not: every decode step replays a
        whole-step graph, and the rest run eagerly either way, so they would only add start-up time (12-25 s at
        256 sequences on an H200: RESULTS.md, tenth session) and memory."""
        prefill_tokens = prefill_graph_limit(prefill_tokens, self.spec)
        if getattr(self.experts, "captures_steps", False):
            step_graphs = StepGraphs(self, max_num_seqs, microbatches, prefill_tokens)
            try:
                step_graphs.capture()
                self.step_graphs = step_graphs
                return
            except Exception:  # serving goes on with segment graphs and eager rounds
                log.exception("whole-step CUDA graphs could not be captured; decode steps replay segments")
        self.graphs = SegmentGraphs(self, max_num_seqs, microbatches,
                                    prefill_tokens if self.local_experts is not None else 0)
        self.graphs.capture()

    async def warm_up(self, max_batch_tokens: int) -> None:
        """Eager forwards of one sequence of each of warm_up_sizes tokens, before serving (through the expert nodes
        too, when disaggregated): Triton compiles each kernel variant on its first use (a second or more each,
        cached on disk after), which would otherwise land on the first requests. Writes only to cache blocks no
        sequence owns yet."""
        block_size = self.kv_cache.block_size
        for tokens in warm_up_sizes(min(max_batch_tokens, self.context_len, self.kv_cache.num_blocks * block_size)):
            seq = Sequence("warm-up", [0] * tokens, SamplingParams(max_tokens=1), 0,
                           block_ids=list(range(-(-tokens // block_size))))
            await self.forward(-tokens, [seq], 1)

    async def forward(self, step: int, seqs: list[Sequence], microbatches: int,
                      end_step: bool = True) -> torch.Tensor:
        """Logits of each sequence's last new token, [len(seqs), vocab], in seqs order. end_step=False: returns
        without waiting for the step's M2N rounds (async scheduling waits for them with its tokens: finish_step)."""
        groups = split_microbatches(seqs, microbatches)
        if self.step_graphs is not None and microbatches == self.step_graphs.microbatches:
            key = self.step_graphs.ready_for(seqs, groups)
            if key is not None:  # the whole step is one replay
                await self.experts.begin_step(step, list(key[1]))
                with self.clock.phase("attention"):
                    logits = self.step_graphs.run(key, groups)
                await self._end_rounds(step, end_step)
                return logits
        graphs = [self.graphs.ready_for(mb, g) if self.graphs is not None else None for mb, g in enumerate(groups)]
        self.eager_steps += None in graphs
        if None in graphs and self.graphs is not None and self.local_experts is not None:
            # colocated, a step with prompts its graphs do not cover (too many tokens, prompt logprobs): the decodes
            # replay their graphs, the prompts run as one more microbatch. Not when disaggregated: each microbatch's
            # M2N dispatch waits on the device, so a second one per layer costs more than the graphs save (measured
            # on one H200, RESULTS.md)
            prefilling = [s for s in seqs if s.num_tokens - s.num_cached != 1]
            if 0 < len(prefilling) < len(seqs):
                decoding = [s for s in seqs if s.num_tokens - s.num_cached == 1]
                groups = split_microbatches(decoding, microbatches) + [prefilling]
                graphs = [self.graphs.ready_for(mb, g) for mb, g in enumerate(groups)]
        if self.experts is not None:
            await self.experts.begin_step(step, [sum(len(s.new_token_ids()) for s in group) for group in groups])
        try:
            async with asyncio.TaskGroup() as tasks:  # one failing microbatch cancels the others
                running = [tasks.create_task(self._forward(step, mb, group, graphs[mb]))
                           for mb, group in enumerate(groups)]
        except ExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        logits = torch.cat([task.result() for task in running])
        await self._end_rounds(step, end_step)
        order = [s for group in groups for s in group]
        if order != seqs:  # back to the caller's order
            row_of = {id(s): row for row, s in enumerate(order)}
            logits = logits[to_device([row_of[id(s)] for s in seqs], logits.device)]
        return logits

    async def _end_rounds(self, step: int, wait: bool) -> None:
        """Waits for the step's M2N rounds, or (wait=False) marks where they end on the device, for finish_step to
        wait for that and nothing later."""
        if self.experts is None:
            return
        if wait:
            await self.experts.end_step(step)
        elif torch.device(self.device).type == "cuda":
            self._step_ends[step] = torch.cuda.Event()
            self._step_ends[step].record()

    async def finish_step(self, step: int) -> None:
        """What forward(end_step=False) left: the wait, with its deadline, for the step's M2N rounds."""
        if self.experts is not None:
            await self.experts.end_step(step, self._step_ends.pop(step, None))

    def step_inputs(self, seqs: list[Sequence], pad_to: tuple[int, int] | None = None,
                    table_width: int | None = None) -> tuple[torch.Tensor, StepMetadata, torch.Tensor]:
        """(token ids, metadata, rows to project) of a step over seqs, on the device (host_inputs, one copy)."""
        arrays, sizes, held = self.host_inputs(seqs, pad_to, table_width)
        token_ids, last_token, held_from, *tables = to_device_all(arrays, self.device)
        return self.held_in(token_ids, held_from) if held else token_ids, StepMetadata(*tables, *sizes), last_token

    def host_inputs(self, seqs: list[Sequence], pad_to: tuple[int, int] | None = None,
                    table_width: int | None = None) -> tuple[list[np.ndarray], tuple[int, int, int, int], bool]:
        """A step's inputs on the host: [token ids, rows to project, held-from, *metadata.step_tables], the
        metadata's sizes, and whether any token is held. The rows: each sequence's last new token, then the
        positions whose logits score prompt tokens for the requests that ask (prompt_logprobs.py). Held-from: per
        token, its row in held_tokens (async scheduling: sampled by the step still running, taken on the device by
        held_in), else -1."""
        token_ids, entries, last_token, prompt_rows, held_from, any_held = [], [], [], [], [], False
        held = self.held_tokens[1] if self.held_tokens is not None else {}
        for seq in seqs:
            new = seq.new_token_ids()
            if seq.prompt_logprobs_n is not None:  # (a call per sequence otherwise: this loop is per step)
                prompt_rows += [len(token_ids) + q - seq.num_cached for q in prompt_logprobs.positions(seq)]
            token_ids += new
            held_from += [-1] * len(new)
            if new and new[-1] == PLACEHOLDER:
                held_from[-1], any_held = held[id(seq)], True
            last_token.append(len(token_ids) - 1)
            entries.append((seq.block_ids, seq.num_cached, len(new)))
        last_token += prompt_rows
        if pad_to is not None:  # (sequences, tokens)
            held_from += [-1] * (pad_to[1] - len(token_ids))
            token_ids += [0] * (pad_to[1] - len(token_ids))
            last_token += list(range(len(last_token), pad_to[0]))
        rows = [seq.block_row for seq in seqs]
        mirrored = self.blocks is not None and min(rows, default=0) >= 0  # (not the warm-up's sequences)
        tables, *sizes = step_tables(entries, self.kv_cache.block_size, pad_to, table_width,
                                     (self.blocks.tables, rows) if mirrored else None)
        return [token_ids, last_token, held_from, *tables], tuple(sizes), any_held

    def held_in(self, token_ids: torch.Tensor, held_from: torch.Tensor) -> torch.Tensor:
        """token_ids with the held tokens taken from the device where held_from says (a few kernels, no copy)."""
        held = self.held_tokens[0][held_from.clamp(min=0)]
        return torch.where(held_from >= 0, held, token_ids)

    def segment(self, j: int, h: torch.Tensor, moe_out: torch.Tensor | None, meta: StepMetadata,
                last_token: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Segment j: for j = 0, h holds token ids to embed; for j > 0, moe_out is MoE layer moe_points[j - 1]'s
        output, still to be added to h. Returns (h, x, expert_ids, expert_weights) at the next MoE point, or
        (logits,). Each sublayer's output joins the residual stream inside the next norm (add_rms_norm)."""
        spec, w, eps = self.spec, self.weights, self.spec.rms_norm_eps
        h, out = (w.embed_tokens[h], None) if j == 0 else (h, moe_out)
        first = 0 if j == 0 else self.moe_points[j - 1] + 1
        last = self.moe_points[j] if j < len(self.moe_points) else spec.num_layers - 1
        for i in range(first, last + 1):
            layer = w.layers[i]
            x, h = (rms_norm(h, layer.input_norm, eps), h) if out is None else add_rms_norm(out, h, layer.input_norm, eps)
            out = self_attention(layer, x, meta, self.rotary, self.kv_cache.layer(i), spec)
            x, h = add_rms_norm(out, h, layer.post_attention_norm, eps)
            if layer.router is None:
                out = swiglu(x, *layer.dense_mlp)
                continue
            expert_ids, expert_weights, h = route_and_share(layer, x, h, spec)  # shared experts join h here
            if meta.num_tokens < x.shape[0]:  # a graph's padded rows: no expert computes them
                expert_ids = torch.where(meta.slot_mapping.unsqueeze(1) >= 0, expert_ids, -1)
            if self.local_experts is not None:
                out = fused_moe(x, expert_ids, expert_weights, self.local_experts[i])
                continue
            return h, x, expert_ids, expert_weights
        # out is set: a segment ends after at least one layer, or (the last after a MoE point) starts with its output
        x, _ = add_rms_norm(out[last_token], h[last_token], w.final_norm, eps)
        return (x @ w.lm_head.T,)

    async def _forward(self, step: int, microbatch: int, seqs: list[Sequence], graphs: GraphSet | None) -> torch.Tensor:
        clock = self.clock
        with clock.phase("attention", microbatch):
            if graphs is not None:
                graphs.load(seqs)
            else:
                token_ids, meta, last_token = self.step_inputs(seqs)
        h, moe_out = None, None
        for j in range(len(self.moe_points) + 1):
            with clock.phase("attention", microbatch), self.gpu.span():
                if graphs is not None:
                    outputs = graphs.replay(j)
                else:
                    outputs = self.segment(j, token_ids if j == 0 else h, moe_out, meta, last_token)
            if j == len(self.moe_points):
                logits = outputs[0]
                if graphs is None and len(logits) > len(seqs):  # the prompt rows step_inputs added
                    prompt_logprobs.record(seqs, logits[len(seqs):])
                return logits[:len(seqs)]
            h, x, expert_ids, expert_weights = outputs
            n = graphs.rows if graphs is not None else x.shape[0]  # graphs pad steps to their bucket
            layer = self.moe_points[j]
            with clock.phase("dispatch", microbatch):
                handle = await self.experts.dispatch(step, layer, microbatch, x[:n], expert_ids[:n],
                                                     expert_weights[:n])
            answers = await self.experts.gather(handle)  # untimed: the other microbatches run meanwhile
            with clock.phase("combine", microbatch):
                moe_out = self.experts.reduce(handle, answers, x[:n])
                if graphs is not None:
                    graphs.set_moe_out(moe_out)
        raise AssertionError("unreachable")
