"""Next-token sampling for a whole batch in a few tensor ops: greedy, temperature, top-p, a seed per request.

Randomness comes from a counter-based hash of (seed, draw number, token id) rather than a generator's stream, so
a seeded request draws the same tokens whatever batch it runs in, on CPU and GPU alike, with no host round trip
and nothing a CUDA graph could not replay. Sampling is the Gumbel-max trick: argmax(logits / T + Gumbel noise)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row sampling parameters on the logits' device."""
    temperature: torch.Tensor  # [rows] float32; 0 = greedy
    top_p: torch.Tensor  # [rows] float32 in (0, 1]
    seed: torch.Tensor  # [rows] int64
    draw: torch.Tensor  # [rows] int64: how many tokens this request has drawn before (a new draw each step)
    any_top_p: bool  # host-known: some row has top_p < 1 (else the sort is skipped)
    all_greedy: bool  # host-known: every row is greedy (else noise is drawn)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding 32-bit values (products wrap; low 32 bits kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, draw: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 uniforms in (0, 1), a pure function of (seed, draw, token id)."""
    token = torch.arange(vocab, dtype=torch.int64, device=seed.device)
    key = _hash32((seed & _MASK32) ^ _hash32((seed >> 32) & _MASK32) ^ ((draw * 0x9E3779B1) & _MASK32))
    x = _hash32((key[:, None] ^ ((token[None, :] * 0x27D4EB2F) & _MASK32)) & _MASK32)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """True where a token falls outside its row's nucleus: the smallest most-probable set whose mass reaches
    top_p (the most probable token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p[:, None]
    return torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [rows, vocab] -> token ids [rows] int64, on the logits' device."""
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    temperature = batch.temperature.clamp_min(1e-5)[:, None]
    scaled = logits.float() / temperature
    if batch.any_top_p:
        scaled = scaled.masked_fill(top_p_mask(torch.softmax(scaled, dim=-1), batch.top_p), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(batch.seed, batch.draw, logits.shape[-1])))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(batch.temperature > 0, sampled, greedy)


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> list:
    """[logprob of token, [[id, logprob] of the top_n tokens]] from one row of logits."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, top_n) if top_n > 0 else None
    alternatives = [[int(i), float(v)] for v, i in zip(top.values.tolist(), top.indices.tolist())] if top is not None else []
    return [float(logprobs[token]), alternatives]
