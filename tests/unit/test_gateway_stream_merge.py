"""A stream's tokens that queue up while the gateway is busy go out in one chunk (gateway/app.py `generate`), with the
text, the token count, a stop string's end and an error exactly as one chunk per token gives them."""
import asyncio
import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from expertmesh.gateway.app import ServedModel, create_app
from expertmesh.gateway.nodes import AttentionNodeClient
from expertmesh.gateway.text import TextCodec
from expertmesh.model.spec import ModelSpec
from expertmesh.transport.base import Connection
from expertmesh.transport.protocol import AddRequest, Status, StepOutputs

MODEL = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"
CODEC = TextCodec(MODEL)
WORDS = CODEC.encode(" the cat sat on the mat and ran", add_special_tokens=False)


class ScriptedNode(Connection):
    """An attention node that answers each request with all of its steps at once: every token is queued before the
    stream's task runs again, as when the gateway's event loop is behind its nodes. paced: each step once the stream
    has taken the one before or waits for more, as when the gateway keeps up."""

    def __init__(self, tokens: list[int], error_after: int | None = None, paced: bool = False) -> None:
        self.tokens, self.error_after, self.paced, self.client = tokens, error_after, paced, None

    async def send(self, message) -> None:
        if isinstance(message, AddRequest):
            asyncio.get_running_loop().call_soon(self.answer, message.request_id)

    def answer(self, rid: str, start: int = 0) -> None:
        queue = self.client.streams.get(rid)
        # the stream has not taken the last step yet (nor waits, gathering, for more than have come)
        if self.paced and queue is not None and not queue.empty() and not queue.waiting:
            asyncio.get_running_loop().call_soon(self.answer, rid, start)
            return
        for i, token in enumerate(self.tokens[start:], start):
            if i == self.error_after:
                self.client.on_message(StepOutputs([rid], [-1], ["error"], ["the expert node died"]))
                return
            self.client.on_message(StepOutputs([rid], [token], ["length" if i == len(self.tokens) - 1 else None],
                                               logprobs=[[-0.1 * (i + 1), [[token, -0.1 * (i + 1)], [5, -3.0]]]]))
            if self.paced and i + 1 < len(self.tokens):  # the next step once the stream has taken this one
                asyncio.get_running_loop().call_soon(self.answer, rid, i + 1)
                return

    async def recv(self, timeout_s=None):
        await asyncio.Event().wait()

    async def close(self) -> None:
        pass


def serve(tokens: list[int], error_after: int | None = None, paced: bool = False,
          stream_interval: int = 1) -> TestClient:
    connection = ScriptedNode(tokens, error_after, paced)
    node = AttentionNodeClient(0, connection, node_timeout_s=3600)
    connection.client = node
    node.status = Status(0, True, 0, 0, 0, 0, 0, 0, [], [], [])
    node.last_heard = time.monotonic() + 3600
    served = ServedModel("mini", ModelSpec.from_dir(MODEL).vocab_size, 256, CODEC, nodes=[node], node_wait_s=1.0,
                         stream_interval=stream_interval)
    return TestClient(create_app(served))


def stream(client: TestClient, **fields) -> list[dict]:
    body = {"prompt": "hi", "max_tokens": len(WORDS), "stream": True, "stream_options": {"include_usage": True},
            **fields}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_queued_tokens_go_out_in_one_chunk_with_the_same_text_and_count():
    with serve(WORDS) as client:
        events = stream(client)
        whole = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": len(WORDS)}).json()
    chunks = [e for e in events if e["choices"]]
    assert len(chunks) < len(WORDS)  # merged: one chunk a token would be len(WORDS)
    assert "".join(c["choices"][0]["text"] for c in chunks) == CODEC.decode(WORDS) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == len(WORDS) == whole["usage"]["completion_tokens"]


def test_a_gateway_that_keeps_up_writes_a_chunk_a_token_and_stream_interval_gathers_them():
    """Steps a turn of the event loop apart: one chunk a token; with stream_interval 3, the first token alone, then
    three a chunk, the rest last; the same text and count either way."""
    sizes = {}
    for interval in (1, 3):
        with serve(WORDS, paced=True, stream_interval=interval) as client:
            events = stream(client)
        chunks = [e for e in events if e["choices"]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == CODEC.decode(WORDS)
        assert events[-1]["usage"]["completion_tokens"] == len(WORDS)
        sizes[interval] = len(chunks)
    assert sizes[1] == len(WORDS)
    assert sizes[3] == 1 + -(-(len(WORDS) - 1) // 3)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_logprobs_of_merged_chunks_equal_those_of_a_chunk_a_token(path):
    """The same steps, all queued at once or each taken before the next: the streamed logprobs, concatenated, are
    the same (completions' tokens, logprobs, alternatives and text offsets; chat's content entries)."""
    prompt = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    body = {**prompt, "max_tokens": len(WORDS), "stream": True, "logprobs": 2 if path == "/v1/completions" else True,
            **({} if path == "/v1/completions" else {"top_logprobs": 2})}
    seen = []
    for paced in (False, True):
        with serve(WORDS, paced=paced) as client:
            with client.stream("POST", path, json=body) as response:
                events = [json.loads(line[6:]) for line in response.iter_lines()
                          if line.startswith("data: {")]
        logprobs = [e["choices"][0]["logprobs"] for e in events if e["choices"]]
        if path == "/v1/completions":
            seen.append({key: [x for lp in logprobs for x in lp[key]]
                         for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")})
        else:
            seen.append([x for lp in logprobs if lp for x in lp["content"]])
        seen.append(len(events))
    merged, merged_events, paced, paced_events = seen
    assert merged == paced and merged_events < paced_events
    assert len(merged["tokens"] if path == "/v1/completions" else merged) == len(WORDS)


def test_a_stop_string_inside_a_merged_chunk_ends_it_at_its_token():
    """The tokens after the one that completes the stop string are not the response's, as if each came alone."""
    with serve(WORDS) as client:
        events = stream(client, stop=["sat"])
    chunks = [e for e in events if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " the cat "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    through_sat = next(i for i in range(len(WORDS)) if "sat" in CODEC.decode(WORDS[:i + 1])) + 1
    assert events[-1]["usage"]["completion_tokens"] == through_sat < len(WORDS)


def test_tokens_before_an_error_reach_the_client_then_the_error():
    with serve(WORDS, error_after=3) as client:
        body = {"prompt": "hi", "max_tokens": len(WORDS), "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == CODEC.decode(WORDS[:3])
    assert "the expert node died" in chunks[-1]["error"]["message"]
    assert events[-1] == "[DONE]"


def test_bench_serve_counts_a_streams_tokens_from_its_usage_not_its_events():
    """bench serve's client against a server whose two events carry five tokens: the usage says five."""
    from expertmesh.bench.serve import one_request
    events = [b'data: {"choices": [{"index": 0, "text": " a b", "finish_reason": null}], "usage": null}',
              b'data: {"choices": [{"index": 0, "text": " c d e", "finish_reason": "length"}], "usage": null}',
              b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}',
              b"data: [DONE]"]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in events:
            writer.write(b"%x\r\n%s\n\n\r\n" % (len(event) + 2, event))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await one_request(f"http://127.0.0.1:{port}", [5] * 4, 5)

    result = asyncio.run(main())
    assert result.error is None and result.output_tokens == 5 and result.ttft_s > 0


def test_a_token_queue_wakes_its_reader_once_wake_at_events_wait_or_one_ends_the_stream():
    from expertmesh.gateway.nodes import TokenEvent, TokenQueue

    async def main() -> list:
        queue, woken = TokenQueue(), []
        queue.wake_at = 3

        async def reader() -> None:
            woken.append(await queue.get())
            while not queue.empty():
                woken.append(queue.get_nowait())

        task = asyncio.ensure_future(reader())
        for token in (1, 2):
            queue.put_nowait(TokenEvent(token, None))
            await asyncio.sleep(0)
        seen_after_two = (len(woken), queue.waiting)
        queue.put_nowait(TokenEvent(3, None))
        await task
        first = [e.token_id for e in woken]
        woken.clear()
        task = asyncio.ensure_future(reader())  # one event, but it ends the stream: no waiting for three
        queue.put_nowait(TokenEvent(4, "length"))
        await asyncio.wait_for(task, 1)
        return [seen_after_two, first, [e.token_id for e in woken]]

    assert asyncio.run(main()) == [(0, True), [1, 2, 3], [4]]
