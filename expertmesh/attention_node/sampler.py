"""A step's sampling: each sequence's parameters gathered into one batch, then one batched draw on the device
(ops/sampling.py) and one copy of the tokens to the host.

Each request draws from a hash of its own seed and its token count, so a seeded request gives the same tokens in
any batch, on any device, after a preemption too."""
from __future__ import annotations

import torch

from ..host_copy import to_device
from ..ops.sampling import SamplingBatch, sample, token_logprobs
from ..transport.protocol import SamplingParams
from .scheduler import Sequence


def request_seed(params: SamplingParams, fallback_seed: int) -> int:
    return params.seed if params.seed is not None else fallback_seed


def sampling_batch(seqs: list[Sequence], device: torch.device | str) -> SamplingBatch:
    temperature = [s.sampling.temperature for s in seqs]
    top_p = [s.sampling.top_p for s in seqs]
    as_tensor = lambda values, dtype: to_device(torch.tensor(values, dtype=dtype), device)  # noqa: E731
    return SamplingBatch(as_tensor(temperature, torch.float32), as_tensor(top_p, torch.float32),
                         as_tensor([s.seed for s in seqs], torch.int64),
                         as_tensor([len(s.output_ids) for s in seqs], torch.int64),
                         any_top_p=any(p < 1.0 for p in top_p), all_greedy=all(t == 0.0 for t in temperature))


def sample_step(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list]:
    """Next token of each sequence, and its logprobs where the request asked for them (else None)."""
    tokens = sample(logits, sampling_batch(seqs, logits.device)).tolist()  # the step's one wait on the device
    logprobs = [None if s.sampling.logprobs is None else token_logprobs(logits[i], tokens[i], s.sampling.logprobs)
                for i, s in enumerate(seqs)]
    return tokens, logprobs
