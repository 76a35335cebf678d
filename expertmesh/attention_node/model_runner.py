"""The attention node's forward pass: embed, then per layer attention here and the MoE at the expert nodes.

A step's sequences are split into microbatches that run as concurrent coroutines: while one waits for
the expert nodes, the next runs its attention (ping-pong)."""
from __future__ import annotations

import asyncio

import torch

from ..host_copy import to_device
from ..model.layers import AttentionBatch, RotaryTable, attention, rms_norm, route, swiglu
from ..model.spec import ModelSpec
from ..model.weights import AttentionSideWeights
from ..telemetry import PhaseClock
from ..transport.m2n import M2NClient
from .kv_cache import KVCache
from .scheduler import Sequence


def split_microbatches(seqs: list[Sequence], count: int) -> list[list[Sequence]]:
    """Contiguous groups of roughly equal new-token counts; never an empty group."""
    count = max(1, min(count, len(seqs)))
    tokens = [len(s.new_token_ids()) for s in seqs]
    target = sum(tokens) / count
    groups: list[list[Sequence]] = [[]]
    filled = 0
    for seq, n in zip(seqs, tokens):
        if groups[-1] and filled >= target * len(groups) and len(groups) < count:
            groups.append([])
        groups[-1].append(seq)
        filled += n
    return groups


class ModelRunner:
    def __init__(self, spec: ModelSpec, weights: AttentionSideWeights, kv_cache: KVCache, m2n: M2NClient,
                 device: str) -> None:
        self.spec = spec
        self.weights = weights
        self.kv_cache = kv_cache
        self.m2n = m2n
        self.device = device
        self.clock = PhaseClock()
        self.rotary = RotaryTable(spec.head_dim, spec.rope_theta, kv_cache.max_len, weights.embed_tokens.dtype, device)

    async def forward(self, step: int, seqs: list[Sequence], microbatches: int) -> torch.Tensor:
        """Logits of each sequence's last new token, [len(seqs), vocab], in seqs order."""
        groups = split_microbatches(seqs, microbatches)
        try:
            async with asyncio.TaskGroup() as tasks:  # one failing microbatch cancels the others
                running = [tasks.create_task(self._forward(step, mb, group)) for mb, group in enumerate(groups)]
        except ExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        return torch.cat([task.result() for task in running])

    def _prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, AttentionBatch, torch.Tensor]:
        token_ids, positions, token_slots, ranges, contexts = [], [], [], [], []
        for seq in seqs:
            new = seq.new_token_ids()
            start = len(token_ids)
            token_ids += new
            positions += range(seq.num_cached, seq.num_cached + len(new))
            token_slots += [seq.slot] * len(new)
            ranges.append((start, len(token_ids)))
            contexts.append(seq.num_cached + len(new))
        as_tensor = lambda values: to_device(values, self.device)  # noqa: E731
        batch = AttentionBatch(as_tensor(positions), as_tensor(token_slots), [s.slot for s in seqs], ranges, contexts)
        last_token = as_tensor([end - 1 for _, end in ranges])
        return as_tensor(token_ids), batch, last_token

    async def _forward(self, step: int, microbatch: int, seqs: list[Sequence]) -> torch.Tensor:
        spec, w, clock = self.spec, self.weights, self.clock
        with clock.phase("attention", microbatch):
            token_ids, batch, last_token = self._prepare(seqs)
            h = w.embed_tokens[token_ids]
        for i, layer in enumerate(w.layers):
            with clock.phase("attention", microbatch):
                x = rms_norm(h, layer.input_norm, spec.rms_norm_eps)
                h = h + attention(layer, x, batch, self.rotary, self.kv_cache.k[i], self.kv_cache.v[i],
                                  spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rms_norm_eps)
                x = rms_norm(h, layer.post_attention_norm, spec.rms_norm_eps)
                if layer.router is None:
                    h = h + swiglu(x, *layer.dense_mlp)
                    continue
                expert_ids, expert_weights = route(x, layer.router, spec.top_k, spec.norm_topk_prob)
            with clock.phase("dispatch", microbatch):
                handle = await self.m2n.dispatch(step, i, microbatch, x, expert_ids, expert_weights)
            partials = await self.m2n.gather(handle)  # untimed: the other microbatches run meanwhile
            with clock.phase("combine", microbatch):
                h = h + self.m2n.reduce(handle, partials, x)
        with clock.phase("attention", microbatch):
            h = rms_norm(h[last_token], w.final_norm, spec.rms_norm_eps)
            return h @ w.lm_head.T
