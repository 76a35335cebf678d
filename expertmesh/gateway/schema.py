"""OpenAI-compatible request bodies and error bodies.

Types are strict: a wrong type is a 400, never silently coerced."""
from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .structured import ResponseFormat, StructuredOutputs

log = logging.getLogger(__name__)

# Known OpenAI and vLLM parameters this server does not implement, each with the values that ask for nothing (as
# if absent): any other value is a 400 that names it, never a silent no-op on the output (issue 15).
UNSUPPORTED: dict[str, tuple] = {
    "suffix": (None, ""), "tools": (None, []),  # tools: chat's (on completions, as OpenAI has none)
    "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    "structural_tag": (None,), "use_beam_search": (None, False),
    "length_penalty": (None, 1.0), "allowed_token_ids": (None,), "bad_words": (None, []),
    "include_stop_str_in_output": (None, False), "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "truncate_prompt_tokens": (None,), "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False), "prediction": (None,), "audio": (None,),
    "modalities": (None, ["text"]), "reasoning_effort": (None,), "add_generation_prompt": (None, True),
    "continue_final_message": (None, False), "chat_template": (None,), "chat_template_kwargs": (None, {}),
}
IGNORED = {"user", "store", "metadata", "service_tier"}  # known, and no bearing on output
_warned: set[str] = set()


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = True  # a last chunk with the usage and no choices (true unless false, as in vLLM)
    continuous_usage_stats: bool = False  # vLLM extension: with include_usage, every chunk has its choice's usage


class SamplingFields(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # extra fields: see unsupported_field
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)  # 0: only with a completion's echo
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)  # choices, sampled apart (gateway/choices.py)
    best_of: int | None = Field(default=None, ge=1)  # sampled, of which the n of highest cumulative logprob return
    stream: bool = False
    # vLLM's sampling parameters (ops/sampling.py, ops/logits_processors.py); their defaults ask for nothing
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None  # token id (a string in JSON) -> bias, clamped to [-100, 100]
    top_k: int = Field(default=0, ge=-1)  # 0 or -1: off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # vLLM extension
    return_token_ids: bool = False  # vLLM extension: token ids in the response
    # expertmesh extension: seconds from arrival past which the request is aborted (504, or an error event on a
    # stream); the server's --request-timeout, when set, is the most it may be
    timeout: float | None = Field(default=None, gt=0)
    stream_options: StreamOptions | None = None  # only with stream (400 otherwise, as OpenAI and vLLM)
    # vLLM extension: each prompt token's logprob, rank and this many most likely alternatives; not with stream
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    # structured outputs (gateway/structured.py): at most one of these
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None  # vLLM's guided_*: a JSON schema, a regex, one of strings,
    guided_regex: str | None = None  # an EBNF grammar
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's newer form of the guided_* fields

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported_field(self) -> str | None:
        """The policy for fields this schema does not declare: a known parameter asking for what this server does
        not do is returned (the caller's 400); any other unknown field is ignored with one warning per name
        (vLLM's behaviour)."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED:
                if value not in UNSUPPORTED[name]:
                    return name
            elif name not in IGNORED and name not in _warned and len(_warned) < 1000:  # bounded: names are input
                _warned.add(name)
                log.warning("ignoring the unknown request field %r (warned once per name)", name)
        return None


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0},
        {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4, "stream": True, "logprobs": 2, "seed": 7, "stop": ["\n"],
         "echo": True, "stream_options": {"include_usage": True}}]})
    # one prompt (text, or token ids), or a batch of them: a list of texts, or a list of token-id lists
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False  # the prompt ahead of the completion (its tokens' logprobs too, with logprobs)
    add_special_tokens: bool = True  # vLLM's: the tokenizer's special tokens (BOS) added to a text prompt

    def prompts(self) -> list[str | list[int]]:
        """The batch: a string or a list of ints is one prompt (a list of ints is never a batch of one-token ones)."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def top_logprobs_n(self) -> int | None:
        return self.logprobs


class RequestPart(BaseModel):
    """A part of a request body: strict types, unknown fields ignored."""
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(RequestPart):
    type: Literal["text"]
    text: str


class FunctionCall(RequestPart):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(RequestPart):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(RequestPart):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None  # None only for an assistant's message with tool_calls
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(RequestPart):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # the arguments always follow parameters when the grammar forces a call


class Tool(RequestPart):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestPart):
    name: str


class NamedToolChoice(RequestPart):
    type: Literal["function"]
    function: FunctionName


class ChatRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Bonjour"}], "max_tokens": 8, "temperature": 0},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "hi"}]}], "max_completion_tokens": 4, "stream": True, "logprobs": True,
         "top_logprobs": 2, "return_token_ids": True}]})
    messages: list[ChatMessage] = Field(min_length=1)
    # vLLM's; by default off where the tokenizer has a chat template, which places its special tokens itself (as
    # transformers' apply_chat_template tokenizes), on for the plain transcript used where it has none
    add_special_tokens: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)
    # tool calling (gateway/tools.py); tool_choice defaults to auto with tools, none without
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # false: at most one call (enforced when the grammar forces calls)

    def top_logprobs_n(self) -> int | None:
        return self.top_logprobs if self.logprobs else None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# Response bodies: what the API documents in its OpenAPI schema (gateway/openapi.py), and what the fuzzing test holds
# every response to. The handlers build plain dicts; these describe them.

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Parallel lists, a token each; with echo the prompt's tokens lead, the first of them with no logprob (null)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # where each token starts in the choice's text


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs: one per token, keyed by its id (a string in JSON): the prompt's token and the
    alternatives asked for."""
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # one per prompt token; null for the first


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprob(TopLogprob):
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class TokenIds(BaseModel):
    """vLLM's return_token_ids: present only when asked for."""
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionChoice(TokenIds):
    index: int  # prompt index * n + sample index, as OpenAI orders a batch's choices
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None
    prompt_logprobs: PromptLogprobs | None = None  # when asked for


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # None when the message is tool calls alone
    tool_calls: list[ToolCall] | None = None  # when the model called tools


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A tool call in a stream: the whole call in one delta (id, type, name, arguments), as a client may join
    several deltas of one index."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatChoice(TokenIds):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChatLogprobs | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # when asked for


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None  # None until the last chunk
    logprobs: CompletionLogprobs | None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion. With stream_options.include_usage, the last has no choices and
    the usage of them all (the others a null usage, or with continuous_usage_stats their choice's so far)."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None  # in the first chunk only
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None  # None until the last chunk
    logprobs: ChatLogprobs | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion; usage as in CompletionChunk."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    not_ready: list[str] | None = None  # the nodes that are not ready, while any is (then the status is 503)
    worker: int = 0  # which gateway process answered (--gateway-workers share the port)


class TraceStarted(BaseModel):
    tracing: bool


class ChromeTrace(BaseModel):
    """Every node's timeline as one Chrome trace (open it in Perfetto)."""
    traceEvents: list[dict[str, Any]]
    displayTimeUnit: str
