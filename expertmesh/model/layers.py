"""The layers of a MoE transformer as plain functions: tensors in, tensors out, no hidden state.

Attention reads and writes a per-layer KV cache indexed by (slot, position), so prefill and decode of
any mix of sequences run through one code path."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..host_copy import to_device
from .weights import ExpertWeights, LayerWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RotaryTable:
    """cos/sin of every position up to max_len (default, unscaled rotary), computed once in float32."""

    def __init__(self, head_dim: int, theta: float, max_len: int, dtype: torch.dtype, device: str) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        self.cos = angles.cos().to(dtype=dtype, device=device)
        self.sin = angles.sin().to(dtype=dtype, device=device)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, head_dim]; positions: [tokens]."""
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


@dataclass
class AttentionBatch:
    """Where a step's tokens sit: tokens are the concatenation of each sequence's new tokens."""
    positions: torch.Tensor  # [tokens] position of each token in its sequence
    token_slots: torch.Tensor  # [tokens] KV-cache slot of each token's sequence
    seq_slots: list[int]  # per sequence: its KV-cache slot
    seq_token_ranges: list[tuple[int, int]]  # per sequence: [start, end) of its new tokens in the step
    seq_context_lens: list[int]  # per sequence: tokens in its cache after this step
    # the decode sequences' rows, slots, longest context and key mask: the same at every layer, built once
    decode_plan: tuple | None = field(default=None, repr=False)


def attention(w: LayerWeights, x: torch.Tensor, batch: AttentionBatch, rotary: RotaryTable,
              k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
              eps: float) -> torch.Tensor:
    """Self-attention of x ([tokens, hidden]); caches are [slots, max_len, kv_heads, head_dim]."""
    tokens = x.shape[0]
    q = (x @ w.q_proj.T).view(tokens, num_heads, head_dim)
    k = (x @ w.k_proj.T).view(tokens, num_kv_heads, head_dim)
    v = (x @ w.v_proj.T).view(tokens, num_kv_heads, head_dim)
    if w.q_norm is not None:
        q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)
    q, k = rotary.apply(q, batch.positions), rotary.apply(k, batch.positions)
    k_cache[batch.token_slots, batch.positions] = k
    v_cache[batch.token_slots, batch.positions] = v

    out = torch.empty_like(q)
    decoding = [i for i, (start, end) in enumerate(batch.seq_token_ranges) if end - start == 1]
    if len(decoding) > 1:
        _decode_attention(q, out, batch, decoding, k_cache, v_cache)
    for i, (slot, (start, end), context) in enumerate(zip(batch.seq_slots, batch.seq_token_ranges,
                                                          batch.seq_context_lens)):
        if len(decoding) > 1 and end - start == 1:
            continue
        q_seq = q[start:end].transpose(0, 1)  # [heads, new, head_dim]
        k_seq = k_cache[slot, :context].transpose(0, 1)  # [kv_heads, context, head_dim]
        v_seq = v_cache[slot, :context].transpose(0, 1)
        new = end - start
        if new == 1:
            mask = None  # a single new token sees the whole context
        else:  # query i sits at position context - new + i and sees keys up to there
            mask = torch.ones(new, context, dtype=torch.bool, device=x.device).tril(diagonal=context - new)
        out[start:end] = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=mask,
                                                        enable_gqa=True).transpose(0, 1)
    return out.reshape(tokens, num_heads * head_dim) @ w.o_proj.T


def _decode_attention(q: torch.Tensor, out: torch.Tensor, batch: AttentionBatch, decoding: list[int],
                      k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """One padded attention call for every sequence that adds a single token (the decode steps): keys
    gathered from the cache up to the longest context, positions past each sequence's context masked."""
    if batch.decode_plan is None:
        device = q.device
        contexts = to_device([batch.seq_context_lens[i] for i in decoding], device)
        longest = max(batch.seq_context_lens[i] for i in decoding)
        mask = (torch.arange(longest, device=device)[None, :] < contexts[:, None])[:, None, None, :]
        batch.decode_plan = (to_device([batch.seq_token_ranges[i][0] for i in decoding], device),
                             to_device([batch.seq_slots[i] for i in decoding], device), longest, mask)
    rows, slots, longest, mask = batch.decode_plan
    keys = k_cache[slots, :longest].transpose(1, 2)  # [seqs, kv_heads, longest, head_dim]
    values = v_cache[slots, :longest].transpose(1, 2)
    attended = F.scaled_dot_product_attention(q[rows].unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=True)
    out[rows] = attended.squeeze(2)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of each token: (expert ids [tokens, k] int32, weights [tokens, k] float32)."""
    probs = torch.softmax((x @ router.T).float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids.to(torch.int32), weights


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def experts_partial_sum(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                        experts: dict[int, ExpertWeights]) -> torch.Tensor:
    """sum over (token, slot) pairs whose expert is in `experts` of weight * expert(token); one row per token.

    Pairs whose id is -1 or not held here contribute nothing (another node computes them)."""
    out = torch.zeros_like(x)
    top_k = expert_ids.shape[1]
    # (token, slot) pairs grouped by expert with one sort, so the host syncs once per call, not per expert
    order = torch.argsort(expert_ids.reshape(-1), stable=True)
    present, counts = torch.unique_consecutive(expert_ids.reshape(-1)[order], return_counts=True)
    rows_sorted, slots_sorted = order // top_k, order % top_k
    start = 0
    for expert_id, count in zip(present.tolist(), counts.tolist()):
        rows, slots = rows_sorted[start:start + count], slots_sorted[start:start + count]
        start += count
        if expert_id < 0:
            continue
        if expert_id not in experts:
            raise KeyError(f"expert {expert_id} was dispatched here but is not held by this node")
        e = experts[expert_id]
        y = swiglu(x[rows], e.gate, e.up, e.down)
        out.index_add_(0, rows, y * expert_weights[rows, slots].unsqueeze(-1).to(y.dtype))
    return out
