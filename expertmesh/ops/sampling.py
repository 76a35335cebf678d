"""Next-token sampling for a whole batch in a few tensor ops: structured outputs' token mask (ops/grammar_mask.py),
biases and penalties (ops/logits_processors.py), greedy, temperature, min-p, top-k, top-p, a seed per request.

Randomness comes from a counter-based hash of (seed, draw number, token id) rather than a generator's stream, so
a seeded request draws the same tokens whatever batch it runs in, on CPU and GPU alike, with no host round trip
and nothing a CUDA graph could not replay. Sampling is the Gumbel-max trick: argmax(logits / T + Gumbel noise)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .grammar_mask import apply_token_bitmask
from .logits_processors import Penalties, TokenBias, apply_bias, apply_penalties

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row sampling parameters on the logits' device. In an all-greedy batch only the logit adjustments are
    made (SamplingBatch.greedy): the draw's tensors would cost the host an upload each and the device nothing."""
    temperature: torch.Tensor | None  # [rows] float32; 0 = greedy
    top_p: torch.Tensor | None  # [rows] float32 in (0, 1]
    seed: torch.Tensor | None  # [rows] int64
    draw: torch.Tensor | None  # [rows] int64: how many tokens this request has drawn before (a new draw each step)
    any_top_p: bool  # host-known: some row has top_p < 1 (else the sort is skipped)
    all_greedy: bool  # host-known: every row is greedy (else noise is drawn)
    # the rest is None when no row uses it (host-known, so the all-greedy batch stays one argmax)
    top_k: torch.Tensor | None = None  # [rows] int64 in [1, vocab]; vocab = off
    min_p: torch.Tensor | None = None  # [rows] float32 in [0, 1]; 0 = off
    bias: TokenBias | None = None
    penalties: Penalties | None = None
    token_bitmask: torch.Tensor | None = None  # [rows, vocab / 32] int32: the tokens each row's grammar allows

    @classmethod
    def greedy(cls, bias: TokenBias | None = None, penalties: Penalties | None = None) -> "SamplingBatch":
        """Every row greedy: the argmax of the adjusted logits (truncation never drops the most probable token)."""
        return cls(None, None, None, None, any_top_p=False, all_greedy=True, bias=bias, penalties=penalties)


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


def min_p_mask(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """True where a token's probability is under min_p times its row's most probable one."""
    return probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)


def top_k_top_p_mask(scaled: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """True where a token falls outside its row's top k (ties with the k-th kept), or outside the nucleus: the
    smallest most-probable set whose mass, renormalised over the top k, reaches top_p (vLLM's order; the most
    probable token always stays). One sort serves both."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    drop_sorted = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        kth = sorted_logits.gather(-1, (top_k - 1)[:, None])
        drop_sorted = sorted_logits < kth
    if top_p is not None:
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop_sorted, float("-inf")), dim=-1)
        drop_sorted = drop_sorted | (sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p[:, None])
    return torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)


def adjust(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The logits every row picks from, greedy ones too: the grammar's mask (first, as vLLM applies it), biases,
    then penalties, which keep a masked token at -inf."""
    if batch.token_bitmask is not None:
        logits = apply_token_bitmask(logits, batch.token_bitmask)
    if batch.bias is not None:
        logits = apply_bias(logits, batch.bias)
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    return logits


def truncate(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature-scaled logits with what min-p, then top-k and top-p, exclude set to -inf."""
    if batch.min_p is not None:
        scaled = scaled.masked_fill(min_p_mask(torch.softmax(scaled, dim=-1), batch.min_p), float("-inf"))
    if batch.top_k is not None or batch.any_top_p:
        scaled = scaled.masked_fill(top_k_top_p_mask(scaled, batch.top_k, batch.top_p if batch.any_top_p else None),
                                    float("-inf"))
    return scaled


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [rows, vocab] -> token ids [rows] int64, on the logits' device."""
    logits = adjust(logits, batch)
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    scaled = truncate(logits.float() / batch.temperature.clamp_min(1e-5)[:, None], batch)
    gumbel = -torch.log(-torch.log(uniform_noise(batch.seed, batch.draw, logits.shape[-1])))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(batch.temperature > 0, sampled, greedy)


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> list:
    """[logprob of token, [[id, logprob] of the top_n tokens]] from one row of logits."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, top_n) if top_n > 0 else None
    alternatives = [[int(i), float(v)] for v, i in zip(top.values.tolist(), top.indices.tolist())] if top is not None else []
    return [float(logprobs[token]), alternatives]
