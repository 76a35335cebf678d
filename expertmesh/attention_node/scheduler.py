"""Continuous batching: requests wait, join the running batch between steps, and leave when done.

Each step takes one new token from every running sequence (decode) and whole prompts of newly
admitted ones (prefill), as one flat batch of tokens."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..transport.protocol import SamplingParams
from .kv_cache import KVCache


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    generator: torch.Generator | None  # seeded per request; None for greedy
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    num_cached: int = 0  # tokens whose K/V are in the cache
    aborted: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def new_token_ids(self) -> list[int]:
        """Tokens this sequence feeds to the next step: what is not cached yet."""
        return (self.prompt_ids + self.output_ids)[self.num_cached:]


class Scheduler:
    def __init__(self, kv_cache: KVCache, max_batch_tokens: int, eos_token_ids: tuple[int, ...]) -> None:
        self.kv_cache = kv_cache
        self.max_batch_tokens = max_batch_tokens
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def queued_tokens(self) -> int:
        return sum(len(s.prompt_ids) for s in self.waiting) + sum(s.num_tokens for s in self.running)

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens + seq.sampling.max_tokens > self.kv_cache.max_len:
            raise ValueError(f"request {seq.request_id}: {seq.num_tokens} prompt tokens + max_tokens "
                             f"{seq.sampling.max_tokens} exceed the context of {self.kv_cache.max_len}")
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                seq.aborted = True  # leaves at the end of the step in flight
                return seq
        return None

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step: every running one, plus waiting ones while slots and budget last."""
        budget = self.max_batch_tokens - len(self.running)
        while self.waiting and self.kv_cache.free_slots > 0:
            prompt_len = len(self.waiting[0].prompt_ids)
            if prompt_len > budget and self.running:
                break  # admit it once the batch is lighter; alone, any prompt is admitted
            seq = self.waiting.popleft()
            seq.slot = self.kv_cache.allocate()
            self.running.append(seq)
            budget -= prompt_len
        return list(self.running)

    def advance(self, seq: Sequence, token: int) -> str | None:
        """After a step: seq's KV cache holds every token so far, `token` is its next output. Returns why seq
        finished (and frees its slot), or None if it goes on."""
        seq.num_cached = seq.num_tokens
        seq.output_ids.append(token)
        reason = self.finish_reason(seq)
        if reason is not None:
            self.release(seq)
        return reason

    def finish_reason(self, seq: Sequence) -> str | None:
        """Why seq stops after its latest token, or None if it goes on."""
        if seq.aborted:
            return "abort"
        if not seq.sampling.ignore_eos and seq.output_ids and seq.output_ids[-1] in self.eos_token_ids:
            return "stop"
        if len(seq.output_ids) >= seq.sampling.max_tokens or seq.num_tokens >= self.kv_cache.max_len:
            return "length"
        return None

    def release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.kv_cache.release(seq.slot)
