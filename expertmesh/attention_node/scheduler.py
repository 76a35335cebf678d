"""Continuous batching over a paged KV cache: requests wait, join the running batch between steps, leave when done.

Each step takes one new token from every decoding sequence and, within a budget of max_batch_tokens new tokens,
chunks of the prompts being prefilled (chunked prefill, as vLLM's), as one flat batch of tokens: a prompt longer
than the budget takes several steps, and samples its first token with its last chunk. The budget is also what the
M2N buffers hold (m2n/lockstep.py), so no step exceeds them. A sequence is admitted when a batch slot, some token
budget and free KV blocks (for its whole prompt) allow; when a running sequence needs a block and none is free,
the newest running sequence is preempted by recomputation: its blocks are freed and it waits at the front of the
queue, to re-feed its prompt and the tokens it produced so far, in chunks as any prompt, when readmitted."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..kv.block_manager import BlockManager
from ..transport.protocol import SamplingParams

if TYPE_CHECKING:  # xgrammar is imported only once a request asks for a grammar
    from .grammar import GrammarState


PLACEHOLDER = -1  # an output token sampled on the device, not yet on the host (Scheduler.hold)


@dataclass(eq=False)  # identity: the scheduler finds and removes sequences by object, not by value
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int  # of its random draws (ops/sampling.py); unused when greedy
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # its KV-cache blocks, in token order (kv/block_manager.py)
    block_row: int = -1  # where the block manager mirrors block_ids (BlockManager.tables); -1: it does not
    num_cached: int = 0  # tokens whose K/V are in the cache
    num_new: int | None = None  # tokens it feeds this step (Scheduler.schedule); None: every uncached one
    partial: bool = False  # this step feeds it a chunk that ends inside what it re-feeds: it samples nothing
    aborted: bool = False
    arrived_s: float = 0.0  # time.monotonic() when the node received it
    queue_s: float | None = None  # from arrival to its first step (a readmission after preemption does not count)
    prompt_logprobs_n: int | None = None  # alternatives per prompt position; None: the request wants no prompt logprobs
    prompt_logprobs: list = field(default_factory=lambda: [None])  # gathered across prefill steps (prompt_logprobs.py)
    grammar: GrammarState | None = None  # structured output: its matcher has accepted exactly output_ids

    def append(self, token: int) -> None:
        """The one place outputs grow, so that the grammar's matcher follows them (through preemptions too)."""
        self.output_ids.append(token)
        if self.grammar is not None:
            self.grammar.accept(token)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def may_stop(self) -> bool:
        """vLLM's min_tokens: until the output has that many tokens, EOS and stop_token_ids are neither drawn
        (masked at sampling) nor a reason to finish."""
        return len(self.output_ids) >= self.sampling.min_tokens

    @property
    def samples(self) -> bool:
        """Whether this step feeds the sequence's last token, whose logits give its next one."""
        return not self.partial

    def new_token_ids(self) -> list[int]:
        """Tokens this sequence feeds to the next step: what is not cached yet, at most num_new of it."""
        prompt_len = len(self.prompt_ids)
        end = None if self.num_new is None else self.num_cached + self.num_new
        if self.num_cached >= prompt_len:  # decoding, or re-feeding outputs: no copy of the prompt at every step
            return self.output_ids[self.num_cached - prompt_len:None if end is None else end - prompt_len]
        return (self.prompt_ids + self.output_ids)[self.num_cached:end]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batch_tokens: int, context_len: int,
                 eos_token_ids: tuple[int, ...], watermark: float = 0.01, max_waiting_steps: int = 0) -> None:
        if max_batch_tokens < max_num_seqs:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} < max_num_seqs={max_num_seqs}: a full batch's "
                             f"decode tokens would not fit a step")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.context_len = context_len
        self.eos_token_ids = set(eos_token_ids)
        # blocks kept free when admitting beside running sequences, so their next decodes do not preempt at once
        self.watermark_blocks = int(watermark * blocks.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission: the last is the first preempted
        # the running sequences with more than their next token still to feed (a prompt, or a readmission's
        # re-feed), oldest first: the others decode, and a step touches nothing of theirs but its one token
        self.prefilling: list[Sequence] = []
        # while sequences decode, new prompts wait up to this many steps to join together (TGI's max_waiting_tokens):
        # on a GPU a step that prefills beside decodes runs eagerly, at several decode steps' cost (RESULTS.md,
        # eighth session), so fewer, fuller such steps trade some TTFT for TPOT. 0: they join at once
        self.max_waiting_steps = max_waiting_steps
        self.steps_held = 0  # consecutive steps the queue's head has been held so
        self.num_preemptions = 0

    @property
    def queued_tokens(self) -> int:
        return sum(s.num_tokens for s in self.waiting) + sum(s.num_tokens for s in self.running)

    def add(self, seq: Sequence) -> None:
        """Queues seq; refuses (ValueError) a request that could never run: its prompt plus max_tokens exceed
        the context, or its longest cache would need more blocks than the cache has."""
        max_tokens = seq.sampling.max_tokens
        if seq.num_tokens + max_tokens > self.context_len:
            raise ValueError(f"request {seq.request_id}: {seq.num_tokens} prompt tokens + max_tokens "
                             f"{max_tokens} exceed the context of {self.context_len}")
        # the last output token is sampled but never fed, so the cache holds at most num_tokens + max_tokens - 1
        needed = self.blocks.blocks_for(seq.num_tokens + max_tokens - 1)
        if needed > self.blocks.num_blocks:
            raise ValueError(f"request {seq.request_id}: {seq.num_tokens} prompt tokens + max_tokens {max_tokens} "
                             f"need {needed} KV-cache blocks of {self.blocks.block_size} tokens; the cache has "
                             f"{self.blocks.num_blocks}")
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """The request's sequence, gone from the queue now if it waited or was still being prefilled (a long prompt
        would otherwise go on being fed until its last chunk), else flagged to leave with its next token. A step
        in flight that feeds a released sequence's chunk writes blocks that only later steps can reuse."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                if seq in self.prefilling:
                    self.release(seq)
                else:
                    seq.aborted = True  # leaves at the end of the step in flight
                return seq
        return None

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step: one token for every decoding sequence, then chunks of the budget left
        for the sequences being prefilled, oldest first, then waiting sequences admitted while batch slots, budget
        and free blocks last (the last admitted may get a chunk only). Those prefilling get num_new and partial
        set here; decoding ones got num_new = 1 when their last token was sampled (advance, hold). Each returned
        sequence owns blocks for all its tokens."""
        preempted = self._reserve_decode_blocks()
        budget = self.max_batch_tokens - (len(self.running) - len(self.prefilling))
        waiting_for_budget = []
        for seq in list(self.prefilling):
            if budget == 0:
                waiting_for_budget.append(seq)
                continue
            budget -= self._feed(seq, budget)
        held = self._hold_admissions(budget)
        # after a preemption the cache is full: admitting now would only preempt again next step
        while self.waiting and not held and not preempted and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]  # nothing of a waiting sequence is cached
            if not self.blocks.can_allocate(seq.num_tokens, self.watermark_blocks if self.running else 0):
                break  # first come, first served: nothing overtakes the head of the queue
            self.waiting.popleft()
            self.blocks.allocate(seq)
            self.running.append(seq)
            self.prefilling.append(seq)
            budget -= self._feed(seq, budget)
        if not waiting_for_budget:
            return list(self.running)
        left_out = set(map(id, waiting_for_budget))
        return [seq for seq in self.running if id(seq) not in left_out]

    def _hold_admissions(self, budget: int) -> bool:
        """Whether the waiting prompts wait a step more (max_waiting_steps): only beside decoding sequences and while
        a slot is free, until they have waited that many steps or their tokens would fill the step's budget. (Not
        until they would fill the free slots: a full batch frees one slot at a time, so they always would.)"""
        decoding = len(self.running) - len(self.prefilling)
        if not (self.max_waiting_steps and self.waiting and decoding and len(self.running) < self.max_num_seqs) \
                or self.steps_held >= self.max_waiting_steps or sum(s.num_tokens for s in self.waiting) >= budget:
            self.steps_held = 0
            return False
        self.steps_held += 1
        return True

    def _feed(self, seq: Sequence, budget: int) -> int:
        """Gives seq, being prefilled, a chunk of at most budget tokens; returns its size. The chunk that reaches
        its last token makes it a decoding sequence from the next step on."""
        left = seq.num_tokens - seq.num_cached
        seq.num_new = min(left, budget)
        seq.partial = seq.num_new < left
        if not seq.partial:
            self.prefilling.remove(seq)
        return seq.num_new

    def _reserve_decode_blocks(self) -> bool:
        """Gives every running sequence the block its next token needs, oldest first, preempting the newest
        running sequences while none is free. Returns whether any was preempted."""
        block_size = self.blocks.block_size
        starting = [s for s in self.running
                    if -(-(len(s.prompt_ids) + len(s.output_ids)) // block_size) > len(s.block_ids)]
        if not starting:
            return False  # most steps: no running sequence starts a block (a pass of arithmetic, no calls)
        if sum(self.blocks.blocks_to_append(s) for s in starting) <= self.blocks.num_free_blocks:
            for seq in starting:  # room for all (a sequence starts one every block_size tokens): those alone, in order
                self.blocks.append(seq)
            return False
        preempted = False
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            while not self.blocks.can_append(seq):
                self._preempt(self.running[-1])
                preempted = True
                if index == len(self.running):
                    break  # seq itself was the newest
            else:
                self.blocks.append(seq)
                index += 1
        return preempted

    def _preempt(self, seq: Sequence) -> None:
        """Recomputation: seq drops its cache and waits first in line; its outputs stay, so on readmission it
        re-feeds prompt + outputs (new_token_ids) and resumes with its next token."""
        self.running.remove(seq)
        self._stop_prefilling(seq)
        self.blocks.free(seq)
        seq.num_cached, seq.num_new, seq.partial = 0, None, False
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def advance(self, seq: Sequence, token: int) -> str | None:
        """After a step: seq's KV cache holds every token so far, `token` is its next output. Returns why seq
        finished (and frees its blocks), or None if it goes on. After a chunk inside the prompt, only the cache
        has grown: the token is not seq's (advance_chunk)."""
        if seq.partial:
            self.advance_chunk(seq)
            return None
        seq.num_cached, seq.num_new = seq.num_tokens, 1  # its next step feeds this token: it decodes
        seq.append(token)
        reason = self.finish_reason(seq)
        if reason is not None:
            self.release(seq)
        return reason

    def _stop_prefilling(self, seq: Sequence) -> None:
        """seq leaves the prefilling list. Its `partial` stays: a step being launched may still feed it its chunk
        (an abort can come while the node awaits that launch), and must then not take its row for a token."""
        if seq in self.prefilling:  # a short list: the prompts being fed now
            self.prefilling.remove(seq)

    def advance_chunk(self, seq: Sequence) -> None:
        """After (or, with async scheduling, once launched) a step that fed seq a chunk inside its prompt."""
        if not seq.partial:
            raise RuntimeError(f"request {seq.request_id}: its step fed its last token; advance or hold it")
        seq.num_cached += seq.num_new

    def hold(self, seq: Sequence) -> None:
        """advance before the token is known (async scheduling: the next step is scheduled while this one runs):
        PLACEHOLDER stands for it until fill. A sequence that has reached its length leaves now (its last token
        still comes, with its reason); one that samples a stop token leaves at fill, its next step wasted."""
        seq.num_cached, seq.num_new = seq.num_tokens, 1
        seq.output_ids.append(PLACEHOLDER)
        if len(seq.output_ids) >= seq.sampling.max_tokens or seq.num_tokens >= self.context_len:
            self.release(seq)

    def fill(self, seq: Sequence, token: int) -> str | None:
        """The held token, now known: as advance's, returns why seq finished (and frees its blocks) or None."""
        if seq.output_ids[-1] != PLACEHOLDER:
            raise RuntimeError(f"request {seq.request_id}: no held token to fill")
        seq.output_ids[-1] = token
        reason = self.finish_reason(seq)
        if reason is not None:
            if seq in self.waiting:  # preempted while its token was on the device: it must not come back
                self.waiting.remove(seq)
            self.release(seq)
        return reason

    def finish_reason(self, seq: Sequence) -> str | None:
        """Why seq stops after its latest token, or None if it goes on."""
        if seq.aborted:
            return "abort"
        if seq.grammar is not None and seq.grammar.terminated:  # its grammar is complete (or cannot go on)
            return "stop"
        if seq.output_ids and seq.may_stop:
            last = seq.output_ids[-1]
            if (not seq.sampling.ignore_eos and last in self.eos_token_ids) or last in seq.sampling.stop_token_ids:
                return "stop"
        if len(seq.output_ids) >= seq.sampling.max_tokens or seq.num_tokens >= self.context_len:
            return "length"
        return None

    def release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._stop_prefilling(seq)
            self.blocks.free(seq)
