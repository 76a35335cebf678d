"""Structured outputs' token mask on the logits: a packed bitmask per row (bit t of word t // 32 set = token t
allowed, xgrammar's layout) unpacked on the device, and the disallowed tokens' logits set to -inf.

Plain torch, one path for CPU and GPU: the bitmask crosses to the device once per step (vocab / 8 bytes a row), the
unpacking is a shift and an and. Rows whose bitmask is all ones are left as they are."""
from __future__ import annotations

import torch

BITS = 32


def bitmask_words(vocab: int) -> int:
    return (vocab + BITS - 1) // BITS


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab] bool: which tokens each row may sample."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # an arithmetic shift: the sign bit's sign extension is masked off
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] with the tokens bitmask [rows, words] does not allow at -inf (a new tensor)."""
    return logits.masked_fill(~allowed_tokens(bitmask, logits.shape[-1]), float("-inf"))
