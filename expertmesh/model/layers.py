"""The layers of a MoE transformer as plain functions: tensors in, tensors out, no hidden state.

Attention reads and writes a paged KV cache through the step's metadata (kv/metadata.py), so prefill and decode
of any mix of sequences run through one code path; the ops (ops/) pick a GPU kernel or the torch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kv.metadata import StepMetadata
from ..ops.attention import paged_attention
from ..ops.norm import rms_norm  # noqa: F401  (the layers' norm, re-exported)
from ..ops.rotary import apply_rotary_reference, rotate_and_write_kv
from ..ops.router import route  # noqa: F401  (re-exported)
from .weights import LayerWeights


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
        return apply_rotary_reference(x, self.cos, self.sin, positions)


def attention(w: LayerWeights, x: torch.Tensor, meta: StepMetadata, rotary: RotaryTable, k_cache: torch.Tensor,
              v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, eps: float) -> torch.Tensor:
    """Self-attention of x ([tokens, hidden]) over the paged KV cache ([blocks, block_size, kv_heads, head_dim]):
    q/k norms, rotary and the KV write in one op, then every sequence attends causally to its whole context."""
    q = rotate_and_write_kv(x @ w.qkv_proj.T, meta.positions, rotary.cos, rotary.sin, k_cache, v_cache,
                            meta.slot_mapping, num_heads, num_kv_heads, w.q_norm, w.k_norm, eps)
    out = paged_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.query_start, meta.max_query_len,
                          head_dim ** -0.5)
    return out.reshape(x.shape[0], num_heads * head_dim) @ w.o_proj.T


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU MLP with gate and up stacked in one weight ([2 * inter, hidden])."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T
