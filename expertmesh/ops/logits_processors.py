"""Per-request changes to the logits before temperature, for a whole batch in a few tensor ops: token biases
(logit_bias, and min_tokens' masking of stop tokens) and vLLM's repetition, frequency and presence penalties.

They change greedy picks too, so they come before the greedy argmax (vLLM's order: biases, then penalties). Token
lists arrive padded with the vocabulary size, an id past the last column that is scattered into and then dropped."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBias:
    """Sparse additive biases: row r adds values[r, j] to the logit of token ids[r, j]."""
    ids: torch.Tensor  # [rows, width] int64, padded with vocab
    values: torch.Tensor  # [rows, width] float32: logit_bias, or -inf for a stop token not allowed yet


@dataclass
class Penalties:
    """vLLM's penalties: repetition over the prompt's and the output's tokens, frequency and presence over the
    output's. Rows without a penalty hold the neutral values (1, 0, 0) and no token ids."""
    prompt_ids: torch.Tensor | None  # [rows, width] int64 padded with vocab; None: no row has a repetition penalty
    output_ids: torch.Tensor  # [rows, width] int64 padded with vocab
    repetition: torch.Tensor  # [rows] float32 > 0; 1 = off
    frequency: torch.Tensor  # [rows] float32; 0 = off
    presence: torch.Tensor  # [rows] float32; 0 = off


def _scatter_add(ids: torch.Tensor, values: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 with values added at ids (the padding column dropped)."""
    dense = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=ids.device)
    return dense.scatter_add_(1, ids, values)[:, :vocab]


def apply_bias(logits: torch.Tensor, bias: TokenBias) -> torch.Tensor:
    return logits.float() + _scatter_add(bias.ids, bias.values, logits.shape[-1])


def token_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32: how often each token occurs in each row of padded ids."""
    return _scatter_add(ids, torch.ones(ids.shape, dtype=torch.float32, device=ids.device), vocab)


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """vLLM's apply_penalties: a seen token's positive logit is divided by the repetition penalty and a negative
    one multiplied; then frequency x count and presence x (count > 0) over the output are subtracted."""
    vocab = logits.shape[-1]
    output_counts = token_counts(penalties.output_ids, vocab)
    in_output = output_counts > 0
    seen = in_output if penalties.prompt_ids is None else in_output | (token_counts(penalties.prompt_ids, vocab) > 0)
    logits = logits.float()
    repetition = torch.where(seen, penalties.repetition[:, None], 1.0)
    logits = torch.where(logits > 0, logits / repetition, logits * repetition)
    return logits - penalties.frequency[:, None] * output_counts - penalties.presence[:, None] * in_output
