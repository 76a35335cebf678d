"""The layers of a MoE transformer as plain functions: tensors in, tensors out, no hidden state.

Attention reads and writes a paged KV cache through the step's metadata (kv/metadata.py), so prefill and decode
of any mix of sequences run through one code path; the ops (ops/) pick a GPU kernel or the torch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kv.metadata import StepMetadata
from ..ops.attention import paged_attention, write_kv
from .weights import LayerWeights


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


def attention(w: LayerWeights, x: torch.Tensor, meta: StepMetadata, rotary: RotaryTable, k_cache: torch.Tensor,
              v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, eps: float) -> torch.Tensor:
    """Self-attention of x ([tokens, hidden]) over the paged KV cache ([blocks, block_size, kv_heads, head_dim]):
    the step's K/V are written to their slots, then every sequence attends causally to its whole context."""
    tokens = x.shape[0]
    q, k, v = (x @ w.qkv_proj.T).split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k, v = q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim), v.view(tokens, num_kv_heads, head_dim)
    if w.q_norm is not None:
        q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)
    q, k = rotary.apply(q, meta.positions), rotary.apply(k, meta.positions)
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = paged_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.query_start, meta.max_query_len,
                          head_dim ** -0.5)
    return out.reshape(tokens, num_heads * head_dim) @ w.o_proj.T


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of each token: (expert ids [tokens, k] int32, weights [tokens, k] float32)."""
    probs = torch.softmax((x @ router.T).float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids.to(torch.int32), weights


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU MLP with gate and up stacked in one weight ([2 * inter, hidden])."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T
