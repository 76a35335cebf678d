"""A step's sampling: each sequence's parameters (and the token bitmask of those with a grammar) gathered into one
batch, then one batched draw on the device (ops/sampling.py) and one copy of the tokens to the host.

Each request draws from a hash of its own seed and its token count, so a seeded request gives the same tokens in
any batch, on any device, after a preemption too."""
from __future__ import annotations

import torch

from ..host_copy import to_device
from ..ops.grammar_mask import bitmask_words
from ..ops.logits_processors import Penalties, TokenBias
from ..ops.sampling import SamplingBatch, sample, token_logprobs
from ..transport.protocol import SamplingParams
from .scheduler import Sequence


def request_seed(params: SamplingParams, fallback_seed: int) -> int:
    return params.seed if params.seed is not None else fallback_seed


def _tensor(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)


def _padded(rows: list[list], pad) -> list[list]:
    width = max(1, max(len(row) for row in rows))
    return [row + [pad] * (width - len(row)) for row in rows]


def token_bias(seqs: list[Sequence], vocab: int, eos_token_ids: tuple[int, ...],
               device: torch.device | str) -> TokenBias | None:
    """logit_bias, and -inf on the stop tokens of rows still short of min_tokens; None when no row has either."""
    if not any(s.sampling.logit_bias or not s.may_stop for s in seqs):  # the common case, in one cheap pass
        return None
    ids, values = [], []
    for s in seqs:
        p = s.sampling
        masked = [] if s.may_stop else [*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)]
        ids.append([t for t, _ in p.logit_bias] + masked)
        values.append([b for _, b in p.logit_bias] + [float("-inf")] * len(masked))
    if not any(ids):
        return None
    return TokenBias(_tensor(_padded(ids, vocab), torch.int64, device),
                     _tensor(_padded(values, 0.0), torch.float32, device))


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def penalties(seqs: list[Sequence], vocab: int, device: torch.device | str) -> Penalties | None:
    """The penalties of a step, None when no row has one. The token ids are gathered from the host's lists at
    every step and counted on the device (one scatter): no count state to keep per sequence, nothing to fix up
    after a preemption, and no wait on the device; the cost is a host->device copy of the penalised rows' tokens
    per step (vLLM rebuilds its output-token tensor per step too). Rows without a penalty contribute no ids."""
    params = [s.sampling for s in seqs]
    penalised = [_penalised(p) for p in params]
    if not any(penalised):
        return None
    repeated = [p.repetition_penalty != 1.0 for p in params]
    prompt_ids = [s.prompt_ids if r else [] for s, r in zip(seqs, repeated)]
    output_ids = [s.output_ids if on else [] for s, on in zip(seqs, penalised)]
    return Penalties(_tensor(_padded(prompt_ids, vocab), torch.int64, device) if any(repeated) else None,
                     _tensor(_padded(output_ids, vocab), torch.int64, device),
                     *(_tensor(values, torch.float32, device) for values in (
                         [p.repetition_penalty for p in params], [p.frequency_penalty for p in params],
                         [p.presence_penalty for p in params])))


def token_bitmask(seqs: list[Sequence], vocab: int, device: torch.device | str) -> torch.Tensor | None:
    """The allowed tokens of each row with a grammar, filled by its matcher on the host and copied once; rows without
    one allow every token. None (no work at all) when no row has a grammar."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not rows:
        return None
    bitmask = torch.full((len(seqs), bitmask_words(vocab)), -1, dtype=torch.int32)
    for i in rows:
        seqs[i].grammar.fill_bitmask(bitmask, i)
    return to_device(bitmask, device)


def sampling_batch(seqs: list[Sequence], device: torch.device | str, vocab: int,
                   eos_token_ids: tuple[int, ...] = ()) -> SamplingBatch:
    params = [s.sampling for s in seqs]
    temperature = [p.temperature for p in params]
    bias, penalised = token_bias(seqs, vocab, eos_token_ids, device), penalties(seqs, vocab, device)
    if not any(temperature):
        return SamplingBatch.greedy(bias, penalised)
    top_p = [p.top_p for p in params]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    min_p = [p.min_p for p in params]
    return SamplingBatch(_tensor(temperature, torch.float32, device), _tensor(top_p, torch.float32, device),
                         _tensor([s.seed for s in seqs], torch.int64, device),
                         _tensor([len(s.output_ids) for s in seqs], torch.int64, device),
                         any_top_p=any(p < 1.0 for p in top_p), all_greedy=False,
                         top_k=_tensor(top_k, torch.int64, device) if any(k < vocab for k in top_k) else None,
                         min_p=_tensor(min_p, torch.float32, device) if any(m > 0.0 for m in min_p) else None,
                         bias=bias, penalties=penalised)


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """Next token of each sequence, on the logits' device (no wait)."""
    batch = sampling_batch(seqs, logits.device, logits.shape[-1], tuple(eos_token_ids))
    batch.token_bitmask = token_bitmask(seqs, logits.shape[-1], logits.device)
    return sample(logits, batch)


def logprobs_of(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list:
    """Each sampled token's logprobs where its request asked for them (else None)."""
    return [None if s.sampling.logprobs is None else token_logprobs(logits[i], tokens[i], s.sampling.logprobs)
            for i, s in enumerate(seqs)]


def needs_host_tokens(seq: Sequence) -> bool:
    """Whether seq's next draw reads its last token on the host (penalties count it; a grammar's matcher takes it):
    such a sequence's step cannot be sampled before the previous one's tokens are back (async scheduling)."""
    return seq.grammar is not None or _penalised(seq.sampling)


def sample_step(logits: torch.Tensor, seqs: list[Sequence],
                eos_token_ids: tuple[int, ...] = ()) -> tuple[list[int], list]:
    """Next token of each sequence, and its logprobs where the request asked for them (else None)."""
    tokens = sample_tokens(logits, seqs, eos_token_ids).tolist()  # the step's one wait on the device
    return tokens, logprobs_of(logits, seqs, tokens)
