"""Sampling of the next token per sequence: greedy at temperature 0, else temperature and top-p.

Each request samples with its own generator, so a seeded request gives the same tokens in any batch."""
from __future__ import annotations

import torch

from ..transport.protocol import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: [sequences, vocab] -> one token id per sequence."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for i, p in enumerate(params):
        if p.temperature == 0.0:
            tokens.append(greedy[i])
            continue
        probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens.append(int(torch.multinomial(probs.cpu(), 1, generator=generators[i]).item()))
    return tokens


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> list:
    """[logprob of token, [[id, logprob] of the top_n tokens]] from one row of logits."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, top_n) if top_n > 0 else None
    alternatives = [[int(i), float(v)] for v, i in zip(top.values, top.indices)] if top is not None else []
    return [float(logprobs[token]), alternatives]


def make_generator(params: SamplingParams, fallback_seed: int) -> torch.Generator | None:
    if params.temperature == 0.0:
        return None
    return torch.Generator().manual_seed(params.seed if params.seed is not None else fallback_seed)
