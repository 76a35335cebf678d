"""Rotary position tables: cos/sin of every position, default or YaRN-scaled, as transformers computes them.

YaRN (arXiv 2309.00071) interpolates the low frequencies by `factor`, keeps the high ones, ramps between them, and
scales cos/sin by an attention factor; DeepSeek-V3 ships with it, Qwen3 documents it for long contexts."""
from __future__ import annotations

import math

import torch

from ..ops.rotary import apply_rotary_reference
from .spec import Rope


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(rope: Rope, dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim / 2] float32, cos/sin scale): transformers' default and _compute_yarn_parameters, op for op."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryTable:
    """cos/sin of every position up to max_len ([max_len, dim], each frequency's angle in both halves), computed once
    in float32 and scaled as transformers scales them before casting to the model's dtype."""

    def __init__(self, rope: Rope, dim: int, max_len: int, dtype: torch.dtype, device: str) -> None:
        inv_freq, scale = inverse_frequencies(rope, dim)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        self.cos = (angles.cos() * scale).to(dtype=dtype, device=device)
        self.sin = (angles.sin() * scale).to(dtype=dtype, device=device)
        self.interleave = rope.interleave

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, dim]; positions: [tokens]. Interleaved pairs come out in rotate-half order (evens then
        odds), as transformers' apply_rotary_pos_emb_interleave returns them: q and k alike, so q.k is unchanged."""
        if self.interleave:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        return apply_rotary_reference(x, self.cos, self.sin, positions)
