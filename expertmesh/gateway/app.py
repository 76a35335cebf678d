"""The public HTTP API: OpenAI-compatible completions and chat (streaming by server-sent events),
models, health and Prometheus metrics. Bad input is a 400 with an OpenAI-style error body."""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from ..transport.protocol import SamplingParams
from .metrics import GatewayMetrics
from ..telemetry import chrome_trace
from .nodes import AttentionNodeClient, NodeLink
from . import choices, openapi, tools
from .router import RoutingPolicy, choose_node
from .responses import Choice, Chunk, Options, Prompt, total_usage
from .schema import ChatRequest, CompletionRequest, SamplingFields, StreamOptions, error_body
from .structured import GrammarFieldError, check_grammar, requested_grammar
from .text import TextCodec, TextStream


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers
        self.code = code


@dataclass
class ServedModel:
    name: str
    vocab_size: int
    max_model_len: int
    codec: TextCodec
    nodes: list[AttentionNodeClient]
    expert_nodes: list[NodeLink] = field(default_factory=list)
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    api_key: str | None = None  # required on /v1/* and /admin/* when set
    max_pending_requests: int = 1024  # admission bounds (GatewayConfig): past them, 429
    max_pending_tokens: int = 1 << 20
    node_wait_s: float = 10.0  # how long a request waits for a ready attention node before 503 (GatewayConfig)
    request_timeout_s: float | None = None  # a request's longest life, from arrival (GatewayConfig); None: none
    aliases: tuple[str, ...] = ()  # other ids a request's `model` may be (the name is the one reported)
    worker: int = 0  # this gateway process's index among those sharing the port
    stream_interval: int = 1  # tokens a streamed chunk gathers before it is written (GatewayConfig)

    @property
    def all_nodes(self) -> list[NodeLink]:
        return [*self.nodes, *self.expert_nodes]


class DeadlineExceeded(RuntimeError):
    """A request's deadline passed while it was being generated."""


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic()
    seconds: float  # the limit it came from, for the message

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def message(self, where: str) -> str:
        return f"the request's deadline of {self.seconds:g} s passed {where}"


class BearerAuth:
    """With an API key set, the API and the admin endpoints need it; /health and /metrics stay open (vLLM). Plain
    ASGI, not @app.middleware("http"): Starlette's BaseHTTPMiddleware relays every chunk of a streamed response
    through a memory stream of its own, which took about 40% of the gateway's CPU when streaming (py-spy)."""

    def __init__(self, app, served: "ServedModel") -> None:
        self.app, self.served = app, served
        self.expected = f"Bearer {served.api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/v1/", "/admin/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.served.metrics.requests["rejected"] += 1
                body = error_body("missing or wrong API key: send `Authorization: Bearer <key>`",
                                  code="invalid_api_key")
                response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(served: ServedModel) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for node in served.all_nodes:
            node.start()
        yield
        for node in served.all_nodes:
            await node.close()

    app = FastAPI(title="expertmesh", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat of a Mixture-of-Experts model, served by "
                              "disaggregated attention and expert nodes")
    openapi.describe(app, bearer=served.api_key is not None)

    if served.api_key is not None:
        app.add_middleware(BearerAuth, served=served)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        served.metrics.requests["rejected"] += 1
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"),
                                status_code=400)
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's and FastAPI's own errors (a body that is not UTF-8, an unknown path, a wrong method) in
        OpenAI's error body too."""
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        served.metrics.requests["rejected" if exc.status < 500 else "failed"] += 1
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.get("/health", responses=openapi.HEALTH)
    async def health() -> JSONResponse:
        not_ready = [n.name for n in served.all_nodes if not n.ready]
        if not_ready:
            return JSONResponse({"status": "starting or failed", "not_ready": not_ready, "worker": served.worker}, 503)
        return JSONResponse({"status": "ok", "worker": served.worker})

    @app.get("/metrics", response_class=PlainTextResponse, responses=openapi.METRICS)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(served.metrics.render(served.nodes, served.expert_nodes, served.routing),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/trace/start", responses=openapi.TRACE_START)
    async def trace_start() -> dict:
        """Every node starts recording a timeline of its phases."""
        await asyncio.gather(*(node.trace(record=True) for node in served.all_nodes))
        return {"tracing": True}

    @app.post("/admin/trace/stop", responses=openapi.TRACE_STOP)
    async def trace_stop() -> dict:
        """Stops recording; the timelines of all nodes as one Chrome trace (open it in Perfetto)."""
        traces = await asyncio.gather(*(node.trace(record=False) for node in served.all_nodes))
        return chrome_trace({t.node: t.events for t in traces if t is not None},
                            {t.node: t.gpu_events for t in traces if t is not None})

    @app.get("/v1/models", responses=openapi.MODELS)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "expertmesh", "max_model_len": served.max_model_len}]}

    @app.post("/v1/completions", responses=openapi.COMPLETIONS)
    async def completions(body: CompletionRequest):
        prompts = [Prompt(served.codec.encode(p, body.add_special_tokens), p) if isinstance(p, str) else Prompt(p)
                   for p in body.prompts()]
        if not prompts:
            raise APIError(400, "prompt is an empty batch", param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 asks for the prompt alone, only with echo", param="max_tokens")
        return await respond(body, prompts, 16 if body.max_tokens is None else body.max_tokens, chat=False)

    @app.post("/v1/chat/completions", responses=openapi.CHAT_COMPLETIONS)
    async def chat(body: ChatRequest):
        try:
            tool_choice = tools.tool_choice_of(body.tools, body.tool_choice)
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice") from None
        for m in body.messages:
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise APIError(400, f"a {m.role} message needs content", param="messages")
        try:
            text = served.codec.apply_chat_template(tools.template_messages(body.messages), tools.tool_dicts(body.tools))
        except jinja2.TemplateError as exc:  # the template's raise_exception: a conversation it does not take
            raise APIError(400, f"the chat template refused the messages: {exc}", param="messages") from None
        if body.max_tokens == 0:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        specials = body.add_special_tokens if body.add_special_tokens is not None else not served.codec.chat_template
        prompt_ids = served.codec.encode(text, specials)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, served.max_model_len - len(prompt_ids))
        try:
            forced = tools.forced_calls_grammar(body.tools, tool_choice, body.parallel_tool_calls)
        except ValueError as exc:  # xgrammar's refusal of a tool's definition
            raise APIError(400, f"tools: {exc}", param="tools") from None
        return await respond(body, [Prompt(prompt_ids, text)], max_tokens, chat=True,
                             tool_calls=tool_choice != "none", forced_calls=forced,
                             named_tool=not isinstance(tool_choice, str))

    async def respond(body: SamplingFields, prompts: list[Prompt], max_tokens: int, chat: bool,
                      tool_calls: bool = False, forced_calls: list[str] | None = None, named_tool: bool = False):
        arrived = time.monotonic()
        options = Options(chat, body.top_logprobs_n(), echo=getattr(body, "echo", False), prompt_only=max_tokens == 0,
                          prompt_logprobs=body.prompt_logprobs, return_token_ids=body.return_token_ids,
                          tool_calls=tool_calls, named_tool=named_tool)
        # echo with max_tokens 0 asks for the prompt alone: the node samples once after a prefill anyway (vLLM's
        # too), and Choice drops that token
        max_tokens = max(max_tokens, 1)
        check_request(body, prompts, max_tokens)
        sampling = sampling_params(body, max_tokens, await grammar(body, forced_calls))
        count = body.best_of or body.n  # samples drawn per prompt; with best_of > n, the n most likely are returned
        admit(sum(len(p.ids) for p in prompts) * count, len(prompts) * count)
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        limits = [t for t in (served.request_timeout_s, body.timeout) if t is not None]
        deadline = Deadline(arrived + min(limits), min(limits)) if limits else None
        samples = choices.sample_params(sampling, count, ranked=count > body.n)
        drawn, streams = [], []  # index: prompt index * count + sample index (OpenAI's order when count == n)
        for prompt in prompts:
            node = await ready_node(prompt.ids, deadline)
            for params in samples:
                index = len(drawn)
                drawn.append(Choice(index, prompt, options, served.codec))
                rid = request_id if index == 0 else f"{request_id}-{index}"
                node.claim(rid, len(prompt.ids) + params.max_tokens)  # in its load now: the stream submits later
                streams.append(generate(node, rid, prompt.ids, params, options.node_prompt_logprobs,
                                        body.stop_list(), arrived, deadline))
        if body.stream:  # count == n here (check_request)
            return StreamingResponse(sse(request_id, prompts, drawn, streams, body.stream_options, chat),
                                     media_type="text/event-stream")
        try:
            async for index, chunk in choices.interleave(streams):
                drawn[index].take(chunk)
        except DeadlineExceeded as exc:
            raise APIError(504, str(exc), kind="timeout") from None
        except RuntimeError as exc:
            raise APIError(500, str(exc), kind="server_error") from None
        returned = [choice for i in range(0, len(drawn), count) for choice in choices.best(drawn[i:i + count], body.n)]
        for index, choice in enumerate(returned):
            choice.index = index
        response = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": served.name, "choices": [c.body() for c in returned],
                    "usage": total_usage(prompts, returned)}  # each prompt once, the returned choices' tokens (vLLM)
        if chat and options.prompt_logprobs is not None:  # vLLM's place for them in chat: the response's
            response["prompt_logprobs"] = drawn[0].prompt_logprobs_body()
        return response

    async def grammar(body: SamplingFields, forced_calls: list[str] | None) -> list[str] | None:
        """The request's structured output (gateway/structured.py), or its forced tool calls' (gateway/tools.py),
        parsed in a thread (a large schema is work) so that a bad one is a 400 here, not a failed generation."""
        try:
            asked = requested_grammar(body)
            if asked is not None and forced_calls is not None:
                raise GrammarFieldError(asked[0], "not with a tool_choice that forces calls (their grammar is theirs)")
            asked = asked or (("tools", forced_calls) if forced_calls is not None else None)
            if asked is not None:
                await asyncio.to_thread(check_grammar, *asked)
        except GrammarFieldError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        return None if asked is None else asked[1]

    def sampling_params(body: SamplingFields, max_tokens: int, grammar: list[str] | None = None) -> SamplingParams:
        """The request's sampling as the attention node takes it; token ids checked against the vocabulary."""
        bias = []
        for key, value in (body.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if not 0 <= token < served.vocab_size:
                raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {served.vocab_size})",
                               param="logit_bias")
            bias.append([token, min(100.0, max(-100.0, value))])  # vLLM clamps to OpenAI's range
        bad = [t for t in body.stop_token_ids or [] if not 0 <= t < served.vocab_size]
        if bad:
            raise APIError(400, f"stop_token_ids: token id {bad[0]} out of range [0, {served.vocab_size})",
                           param="stop_token_ids")
        return SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, body.ignore_eos,
                              body.top_logprobs_n(), top_k=body.top_k, min_p=body.min_p,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              repetition_penalty=body.repetition_penalty, min_tokens=body.min_tokens,
                              stop_token_ids=list(body.stop_token_ids or []), logit_bias=bias, grammar=grammar)

    def check_request(body: SamplingFields, prompts: list[Prompt], max_tokens: int) -> None:
        if body.model is not None and body.model != served.name and body.model not in served.aliases:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{served.name}`",
                           param="model", code="model_not_found")  # OpenAI's body for an unknown model
        unsupported = body.unsupported_field()
        if unsupported is not None:
            raise APIError(400, f"{unsupported}: not supported by this server", param=unsupported)
        if body.best_of is not None and body.best_of < body.n:
            raise APIError(400, f"best_of ({body.best_of}) must be at least n ({body.n})", param="best_of")
        if body.stream and (body.best_of or body.n) > body.n:
            raise APIError(400, "best_of > n cannot be streamed: the best are known only at the end", param="best_of")
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({body.min_tokens}) must be at most max_tokens ({max_tokens})",
                           param="min_tokens")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if body.prompt_logprobs is not None and body.stream:
            raise APIError(400, "prompt_logprobs are not available with stream: true", param="prompt_logprobs")
        for prompt in prompts:
            check_prompt(prompt.ids, max_tokens)

    def check_prompt(prompt_ids: list[int], max_tokens: int) -> None:
        if not prompt_ids:
            raise APIError(400, "prompt is empty", param="prompt")
        bad = [t for t in prompt_ids if not 0 <= t < served.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} out of range [0, {served.vocab_size})", param="prompt")
        if len(prompt_ids) + max_tokens > served.max_model_len:
            raise APIError(400, f"this model's maximum context length is {served.max_model_len} tokens; the "
                           f"request has {len(prompt_ids)} prompt tokens and asks for {max_tokens} more",
                           param="max_tokens" if len(prompt_ids) < served.max_model_len else "prompt")

    async def ready_node(prompt_ids: list[int], request_deadline: "Deadline | None") -> AttentionNodeClient:
        """The attention node for the request; while none is ready (one restarting, or waiting for a lost expert node
        to rejoin), waits up to node_wait_s for one, then 503 with Retry-After (504 if its own deadline comes first)."""
        deadline = time.monotonic() + served.node_wait_s
        while (node := choose_node(served.nodes, prompt_ids, served.routing)) is None:
            if request_deadline is not None and request_deadline.left() <= 0:
                served.metrics.requests["timed_out"] += 1
                raise APIError(504, request_deadline.message("waiting for an attention node"), kind="timeout")
            if time.monotonic() >= deadline:
                down = ", ".join(n.name for n in served.all_nodes if not n.ready)
                raise APIError(503, f"no attention node is ready (not ready: {down}); retry later",
                               kind="service_unavailable", headers={"Retry-After": "5"})
            await asyncio.sleep(NodeLink.STATUS_INTERVAL_S / 5)  # readiness changes with the nodes' status answers
        return node

    def admit(prompt_tokens: int, samples: int = 1) -> None:
        """429 with Retry-After past the admission bounds (OpenAI's convention for "too many requests"); each of a
        request's samples (n, best_of) counts as a request. Streams count once their generation starts, so a burst
        of new streams may pass a little over."""
        m = served.metrics
        if m.in_flight + samples > served.max_pending_requests or \
                m.in_flight_tokens + samples * prompt_tokens > served.max_pending_tokens:
            raise APIError(429, f"the server is at capacity ({m.in_flight} requests, {m.in_flight_tokens} prompt "
                           f"tokens in flight; bounds {served.max_pending_requests} and {served.max_pending_tokens}): "
                           f"retry later", kind="rate_limit_exceeded", headers={"Retry-After": "1"})

    async def generate(node: AttentionNodeClient, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                       prompt_logprobs: int | None, stop: list[str], arrived: float,
                       deadline: "Deadline | None") -> AsyncIterator[Chunk]:
        served.metrics.in_flight += 1
        served.metrics.in_flight_tokens += len(prompt_ids)
        served.metrics.prompt_tokens += len(prompt_ids)
        queue = await node.submit(request_id, prompt_ids, sampling, prompt_logprobs)
        stream = TextStream(served.codec, stop, sampling.min_tokens)
        outcome, first_token_s, generated = "aborted", None, 0
        # what the stream has gathered and not yet written: text, token ids, their logprobs, and the chunks written
        text, tokens, logprobs, written = [], [], [], 0
        try:
            while True:
                try:
                    events = [await (queue.get() if deadline is None else
                                     asyncio.wait_for(queue.get(), deadline.left()))]
                except TimeoutError:  # the finally aborts the sequence at its node
                    outcome = "timed_out"
                    raise DeadlineExceeded(deadline.message(f"after {generated} generated tokens")) from None
                # Tokens that came while this stream waited for the event loop go out in one chunk: one write to the
                # client, not one a token, so a gateway behind its nodes catches up instead of falling further
                # behind (RESULTS.md, fourteenth session; vLLM's output collector merges the same way).
                while events[-1].finish_reason is None and not queue.empty():
                    events.append(queue.get_nowait())
                reason, failure, gathered = None, None, len(tokens)
                for event in events:  # one by one through the text stream: a stop string ends it where it would
                    if event.finish_reason == "error":
                        failure = event.error
                        break
                    token = [event.token_id] if event.token_id >= 0 else []
                    if token and first_token_s is None:
                        first_token_s = time.monotonic() - arrived
                    if event.queue_s is not None:
                        served.metrics.queue_time.observe(event.queue_s)
                    # an EOS or stop_token_ids token that ended it at the node keeps its id and logprob but adds no
                    # text (vLLM)
                    delta = stream.push([] if event.finish_reason == "stop" else token,
                                        final=event.finish_reason is not None)
                    text.append(delta.text)
                    tokens += token
                    if token and event.logprobs:
                        logprobs.append(event.logprobs)
                    reason = "stop" if delta.stopped else event.finish_reason
                    if reason is not None:
                        break
                # counted once a wake-up, not once a token: an increment of a counter the gateway processes share
                # costs 1.6-1.7 us (benchmarks/gateway_counter_cost.py)
                served.metrics.generation_tokens += len(tokens) - gathered
                generated += len(tokens) - gathered
                if failure is not None:
                    if tokens:  # what came before the error, as it came
                        yield Chunk("".join(text), tokens, None, logprobs or None,
                                    None if written else events[0].prompt_logprobs)
                    outcome = "failed"
                    raise RuntimeError(f"generation failed: {failure}")
                if reason is None and written and len(tokens) < served.stream_interval:
                    continue  # gathering (stream_interval): the first chunk and the last go at once
                if reason is not None:
                    outcome = "completed"
                # the prompt's logprobs come with the first token, so with the first chunk
                yield Chunk("".join(text), tokens, reason, logprobs or None, events[0].prompt_logprobs)
                text, tokens, logprobs, written = [], [], [], written + 1
                queue.wake_at = served.stream_interval  # after the first chunk: wake once a chunk's tokens wait
                if reason is not None:
                    return
        finally:
            served.metrics.in_flight -= 1
            served.metrics.in_flight_tokens -= len(prompt_ids)
            served.metrics.requests[outcome] += 1
            if outcome == "completed":
                served.metrics.observe(first_token_s, time.monotonic() - arrived, generated)
            await node.abort(request_id)  # no-op once the node has finished it

    async def sse(request_id: str, prompts: list[Prompt], drawn: list[Choice], streams: list[AsyncIterator[Chunk]],
                  options: StreamOptions | None, chat: bool) -> AsyncIterator[str]:
        head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": served.name}
        opening = "data: " + json.dumps(head)[:-1] + ', "choices": ['  # each chunk's, encoded once
        # OpenAI's stream_options.include_usage: a null usage on every chunk, the total on a last one with no choices
        include_usage = options is not None and options.include_usage
        continuous = include_usage and options.continuous_usage_stats  # vLLM's: each chunk its choice's so far
        try:
            async for index, chunk in choices.interleave(streams):
                choice = drawn[index]
                delta = json.dumps(choice.stream_delta(chunk))
                if include_usage:
                    yield f'{opening}{delta}], "usage": {json.dumps(choice.usage() if continuous else None)}}}\n\n'
                else:
                    yield f"{opening}{delta}]}}\n\n"
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': total_usage(prompts, drawn)})}\n\n"
        except RuntimeError as exc:
            kind = "timeout" if isinstance(exc, DeadlineExceeded) else "server_error"
            yield f"data: {json.dumps(error_body(str(exc), kind))}\n\n"
        yield "data: [DONE]\n\n"

    return app
