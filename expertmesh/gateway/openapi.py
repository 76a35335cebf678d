"""The gateway's OpenAPI schema (/openapi.json, /docs): every endpoint with the responses it really gives — bodies
from schema.py, server-sent events, Prometheus text — and invalid bodies as the 400s they are, not FastAPI's 422."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pydantic import BaseModel

from .schema import (UNSUPPORTED, ChatCompletionChunk, ChatCompletionResponse, ChromeTrace, CompletionChunk,
                     CompletionResponse, ErrorResponse, Health, ModelList, TraceStarted)

_ERRORS = {
    400: "Invalid request: malformed JSON, a field of the wrong type or out of range, a prompt too long or empty (an "
         "empty batch too), `max_tokens: 0` without `echo`, `stream_options` without `stream`, `prompt_logprobs` "
         "with `stream`, a structured output or tool that does not parse, two structured outputs at once",
    401: "Missing or wrong API key (when the server has one: `Authorization: Bearer KEY`)",
    404: "No such model: `model` is none of the served names",
    429: "At capacity (requests or prompt tokens in flight): retry after `Retry-After` seconds",
    500: "Generation failed, e.g. its attention node was lost",
    503: "No attention node is ready: retry after `Retry-After` seconds",
    504: "The request's deadline (`timeout`, or the server's --request-timeout) passed before it finished",
}
Responses = dict[int | str, dict[str, Any]]


def errors(*statuses: int) -> Responses:
    """OpenAI's error body, for each status."""
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def server_sent_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One event of a stream (Open API before 3.2 has a stream's `schema` describe each event): its data a chunk,
    an error body (generation failed; the stream's last chunk), or the `[DONE]` that ends every stream."""
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]}}
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"type": "string"}, "data": {"anyOf": [{"const": "[DONE]"}, data]}}}


def generation(body: type[BaseModel], chunk: type[BaseModel]) -> Responses:
    """A completion as JSON, or with `stream: true` as server-sent events."""
    return {200: {"model": body, "description": "The whole response, a choice per prompt of a batch (times `n`); "
                  "with `stream: true`, server-sent events instead: one `data: {...}` per chunk of one choice, with "
                  "`stream_options.include_usage` a last chunk with no choices and the usage, an error body as a "
                  "last chunk if generation fails, then `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": server_sent_event(chunk)}}},
            **errors(400, 401, 404, 429, 500, 503, 504)}


_CHUNKS = (CompletionChunk, ChatCompletionChunk)  # referenced by the event streams, not by FastAPI's routes
COMPLETIONS = generation(CompletionResponse, CompletionChunk)
CHAT_COMPLETIONS = generation(ChatCompletionResponse, ChatCompletionChunk)
MODELS: Responses = {200: {"model": ModelList, "description": "The served model (its first name)"}, **errors(401)}
HEALTH: Responses = {200: {"model": Health, "description": "Every node is ready"},
                     503: {"model": Health, "description": "Some node is starting, restarting or lost: `not_ready`"}}
METRICS: Responses = {200: {"description": "Prometheus text format"}}
TRACE_START: Responses = {200: {"model": TraceStarted, "description": "Every node records its phases"},
                          **errors(401)}
TRACE_STOP: Responses = {200: {"model": ChromeTrace, "description": "Every node's timeline, as one Chrome trace"},
                         **errors(401)}


PARAMETERS = (
    "Sampling as vLLM has it: `temperature` (0: greedy), `top_p`, `top_k` (0 or -1: off), `min_p`, `seed` (sample i "
    "of `n` draws with seed + i), `presence_penalty` and `frequency_penalty` (over the output's tokens), "
    "`repetition_penalty` (over the prompt's and the output's), `logit_bias` (token id -> bias, clamped to "
    "[-100, 100]), `min_tokens` (no EOS or `stop_token_ids` before), `stop` strings and `stop_token_ids` (neither in "
    "the text), `ignore_eos`, `max_tokens`, `n`, `best_of` (that many samples, the `n` of highest cumulative logprob "
    "returned; not with `stream`), `logprobs`, `return_token_ids`, `timeout`, `add_special_tokens` (the tokenizer's "
    "BOS on a text prompt: by default on for completions, off for chat where the chat template places it).\n\n"
    "Structured outputs, at most one a request, enforced by a grammar (xgrammar) masking each step's tokens on the "
    "attention node: `response_format` (`{\"type\": \"json_object\"}`: any JSON; `{\"type\": \"json_schema\", "
    "\"json_schema\": {\"name\": ..., \"schema\": {...}}}`), vLLM's `guided_json` (a JSON schema), `guided_regex`, "
    "`guided_choice` (one of the strings), `guided_grammar` (EBNF, xgrammar's dialect) and `structured_outputs` "
    "(`{\"json\" | \"regex\" | \"choice\" | \"grammar\" | \"json_object\" | \"structural_tag\": ...}`). The output ends "
    "when the grammar is complete; a malformed one is a 400 that names its field.\n\n"
    "Tool calling (chat): `tools` (functions with a JSON schema of their `parameters`), rendered by the chat "
    "template, and `tool_choice`: `auto` (the default with tools: calls the model writes as "
    "`<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>`, Qwen3's and Hermes' syntax, come back as "
    "`tool_calls`), `none`, `required` or `{\"type\": \"function\", \"function\": {\"name\": ...}}` (the grammar "
    "forces a call, to that function, with arguments that follow its schema; `parallel_tool_calls: false`: one "
    "call). With calls, `finish_reason` is `tool_calls` (`stop` for a named function, as OpenAI answers); a stream "
    "sends each call whole in one `tool_calls` delta once it is complete. Assistant messages with `tool_calls` and `tool` messages are taken.\n\n"
    "A known OpenAI or vLLM parameter this server does not implement is a 400 that names it in `param`, unless its "
    "value asks for nothing (`tools: []` on completions, `use_beam_search: false`): "
    + ", ".join(f"`{name}`" for name in sorted(UNSUPPORTED)) + ". Any other unknown field is ignored, with one "
    "warning per name in the server's log (vLLM's behaviour).")


def describe(app: FastAPI, bearer: bool = False) -> None:
    """Builds /openapi.json as FastAPI does, less the 422 it documents for every body (ours are 400s); with bearer (the
    server has an API key), /v1/* and /admin/* say they need it, so that clients and /docs send it."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for path in ("/v1/completions", "/v1/chat/completions"):
                operation = schema["paths"][path]["post"]
                operation["description"] = (operation.get("description", "") + "\n\n" + PARAMETERS).strip()
            for chunk in _CHUNKS:
                chunk_schema = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(chunk_schema.pop("$defs", {}))
                components[chunk.__name__] = chunk_schema
            if bearer:
                schema["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
                for path, operations in schema["paths"].items():
                    for operation in operations.values():
                        if path.startswith(("/v1/", "/admin/")):
                            operation["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
