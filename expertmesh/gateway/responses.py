"""OpenAI's response bodies from the chunks of each choice's generation: text, logprobs (chat's `content` list, or the
completions' parallel lists with text offsets), the echoed prompt, vLLM's prompt_logprobs, and usage.

A `Choice` follows one generation as its chunks come, so that a stream's chunks and a whole response are built from
the same state. Its index is prompt index * n + sample index: OpenAI's order for the choices of a batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

from .text import TextCodec
from .tools import ToolCallStream


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None  # as the request gave it; None when it gave token ids (decoded if echoed)


@dataclass
class Chunk:
    """What one step's output adds to a choice, as the gateway's text stream releases it."""
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None = None  # one [logprob, [[token, logprob], ...]] per token id
    prompt_logprobs: list | None = None  # with the first chunk, when asked: StepOutputs.prompt_logprobs' entries


@dataclass(frozen=True)
class Options:
    """What a request asks of its choices."""
    chat: bool
    logprobs: int | None = None  # alternatives per token; None: no logprobs
    echo: bool = False
    prompt_only: bool = False  # echo with max_tokens 0: the one token the node samples after the prefill is dropped
    prompt_logprobs: int | None = None  # vLLM's extension
    return_token_ids: bool = False
    tool_calls: bool = False  # chat with tools and a tool_choice other than none: the output is parsed for calls
    named_tool: bool = False  # tool_choice names the function: its call ends with "stop" (OpenAI's and vLLM's)

    @property
    def node_prompt_logprobs(self) -> int | None:
        """Alternatives per prompt position the attention node must compute (None: no prompt logprobs at all)."""
        asked = [n for n in (self.prompt_logprobs, self.logprobs if self.echo else None) if n is not None]
        return max(asked) if asked else None


@dataclass
class Choice:
    index: int
    prompt: Prompt
    options: Options
    codec: TextCodec
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated and returned (an echoed prompt's are not)
    logprobs: list = field(default_factory=list)  # theirs, [logprob, top] each: what best_of ranks choices by
    scored: list[tuple[int, float | None, list]] = field(default_factory=list)  # (token, logprob, top) per token
    finish_reason: str | None = None
    prompt_logprobs: list | None = None
    chunks: int = 0
    text_offset: int = 0  # where the next token's piece starts in the choice's text
    tool_stream: ToolCallStream | None = None  # a stream's tool calls, as their closing tags come

    def stream_delta(self, chunk: Chunk) -> dict:
        """Adds chunk to the choice; returns what it adds as a stream's choice."""
        first = self.chunks == 0
        text, scored = self.take(chunk)
        logprobs = self.logprobs_body(scored) if self.options.logprobs is not None else None
        if not self.options.chat:
            return {"index": self.index, "text": text, "finish_reason": self.finish_reason, "logprobs": logprobs}
        delta: dict = {"role": "assistant"} if first else {}
        if self.options.tool_calls:
            self.tool_stream = self.tool_stream or ToolCallStream()
            text, calls = self.tool_stream.push(text, final=self.finish_reason is not None)
            if calls:
                delta["tool_calls"] = self.tool_stream.deltas(calls)
        delta["content"] = text
        return {"index": self.index, "delta": delta, "finish_reason": self.chat_finish_reason(self.tool_stream),
                "logprobs": logprobs}

    def chat_finish_reason(self, tool_calls: ToolCallStream | None) -> str | None:
        """tool_calls when the output called tools (auto, required), else the generation's: also for a function
        named by tool_choice, as OpenAI and vLLM answer a forced call."""
        called = tool_calls is not None and tool_calls.calls and not self.options.named_tool
        return "tool_calls" if self.finish_reason is not None and called else self.finish_reason

    def take(self, chunk: Chunk) -> tuple[str, list]:
        """Adds chunk to the choice; returns the text and the scored tokens it adds (an echoed prompt's with the
        first chunk)."""
        text, token_ids, entries = chunk.text, chunk.token_ids, chunk.logprobs or []
        if self.options.prompt_only:
            text, token_ids, entries = "", [], []
        scored = [(t, lp, top) for t, (lp, top) in zip(token_ids, entries)]
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        first = self.chunks == 0
        if first and self.options.echo:
            text = self.prompt_text() + text
            if self.options.logprobs is not None:
                n = self.options.logprobs
                scored = [(t, None, None) if e is None else (t, e[0], e[2][:n])
                          for t, e in zip(self.prompt.ids, self.prompt_logprobs)] + scored
        self.chunks += 1
        self.text += text
        self.token_ids += token_ids
        self.logprobs += entries
        self.scored += scored
        self.finish_reason = "length" if self.options.prompt_only else chunk.finish_reason
        return text, scored

    def body(self) -> dict:
        """The whole choice, once every chunk is taken."""
        choice: dict = {"index": self.index, "finish_reason": self.finish_reason,
                        "logprobs": self.logprobs_body(self.scored) if self.options.logprobs is not None else None}
        if self.options.chat and self.options.tool_calls:
            calls = ToolCallStream()
            calls.push(self.text, final=True)
            content = calls.content if calls.content.strip() or not calls.calls else None  # calls alone: null
            choice["message"] = {"role": "assistant", "content": content, **({"tool_calls": calls.calls}
                                                                               if calls.calls else {})}
            choice["finish_reason"] = self.chat_finish_reason(calls)
        elif self.options.chat:
            choice["message"] = {"role": "assistant", "content": self.text}
        else:
            choice["text"] = self.text
            if self.options.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self.prompt_logprobs_body()
        if self.options.return_token_ids:
            choice["token_ids"] = self.token_ids
            choice["prompt_token_ids"] = self.prompt.ids
        return choice

    def prompt_text(self) -> str:
        return self.prompt.text if self.prompt.text is not None else self.codec.decode(self.prompt.ids)

    def piece(self, token: int) -> str:
        return self.codec.decode([token])

    def logprobs_body(self, scored: list[tuple[int, float | None, list | None]]) -> dict:
        """OpenAI's logprobs object: chat's `content` list, or the completions' parallel lists."""
        if self.options.chat:
            return {"content": [{"token": self.piece(t), "logprob": lp, "bytes": list(self.piece(t).encode()),
                                 "top_logprobs": [{"token": self.piece(a), "logprob": alp} for a, alp in top]}
                                for t, lp, top in scored]}
        pieces = [self.piece(t) for t, _, _ in scored]
        offsets = list(accumulate([len(p) for p in pieces], initial=self.text_offset))
        self.text_offset = offsets.pop()
        return {"tokens": pieces, "token_logprobs": [lp for _, lp, _ in scored],
                "top_logprobs": [None if top is None else {self.piece(a): alp for a, alp in top}
                                 for _, _, top in scored],
                "text_offset": offsets}

    def prompt_logprobs_body(self) -> list:
        """vLLM's prompt_logprobs: per prompt token (None for the first), its own logprob and rank, then the
        alternatives asked for, keyed by token id."""
        n = self.options.prompt_logprobs
        out: list = []
        for token, entry in zip(self.prompt.ids, self.prompt_logprobs):
            if entry is None:
                out.append(None)
                continue
            logprob, rank, top = entry
            ranked = {str(token): self.prompt_logprob(token, logprob, rank)}
            for i, (alternative, alp) in enumerate(top[:n]):
                ranked.setdefault(str(alternative), self.prompt_logprob(alternative, alp, i + 1))
            out.append(ranked)
        return out

    def prompt_logprob(self, token: int, logprob: float, rank: int) -> dict:
        return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": self.piece(token)}  # -inf: not JSON

    def usage(self) -> dict:
        """vLLM's continuous_usage_stats: this choice's prompt and its tokens so far."""
        return usage(len(self.prompt.ids), len(self.token_ids))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def total_usage(prompts: list[Prompt], choices: list[Choice]) -> dict:
    """A response's usage: each prompt once (whatever n), every choice's tokens."""
    return usage(sum(len(p.ids) for p in prompts), sum(len(c.token_ids) for c in choices))
