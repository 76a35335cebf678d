"""`bench serve`'s client against minimal HTTP servers of its own: the requests it keeps in flight are the
workload's concurrency (no connection pool in between), and its token count and errors hold however the event
stream is cut."""
from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from expertmesh.bench.serve import Workload, run


async def _serve_once_all_are_open(expected: int):
    """A server that answers /metrics at once and holds every completion until `expected` of them are open
    together, then streams each one token: a client that keeps fewer in flight never gets an answer."""
    open_now, all_open, peak = 0, asyncio.Event(), [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now
        while True:  # keep-alive: one request after another on this connection
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            lines = head.decode().split("\r\n")
            length = next((int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length")), 0)
            await reader.readexactly(length)
            if lines[0].startswith("GET /metrics"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                continue
            open_now += 1
            peak[0] = max(peak[0], open_now)
            if open_now >= expected:
                all_open.set()
            await all_open.wait()
            body = f"data: {json.dumps({'choices': [{'text': 'x'}]})}\n\ndata: [DONE]\n\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            open_now -= 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, peak


def test_the_client_keeps_the_whole_concurrency_in_flight():
    """150 in flight, past httpx's default pool of 100 connections (which held a run of 256 in flight to 100,
    the rest waiting in the client with their TTFT running)."""
    async def main():
        server, peak = await _serve_once_all_are_open(150)
        port = server.sockets[0].getsockname()[1]
        async with server:
            workload = Workload(num_requests=150, input_len=(2, 4), output_len=(1, 1), concurrency=150)
            report = await asyncio.wait_for(run(f"http://127.0.0.1:{port}", workload, progress=None), 10)
        return report, peak[0]

    report, peak = asyncio.run(main())
    assert peak == 150 and report.failed == 0 and report.output_tokens == 150
    assert 0 < report.client_cpu_s


def _sse_server(body: bytes, pieces: int, chunked: bool):
    """A server answering every completion with `body` as an event stream, written in `pieces` uneven parts (events
    cut anywhere, as TCP may deliver them), in chunked transfer encoding (as uvicorn streams) or until it closes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     + (b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Connection: close\r\n\r\n"))
        cuts = sorted({len(body) * i // pieces + i % 3 for i in range(1, pieces)} | {0, len(body)})
        for a, b in zip(cuts, cuts[1:]):
            writer.write(b"%x\r\n%s\r\n" % (b - a, body[a:b]) if chunked else body[a:b])
            await writer.drain()
            await asyncio.sleep(0.001)
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)  # the response is complete: the client must not need the close
        writer.close()

    return asyncio.start_server(handle, "127.0.0.1", 0)


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


@pytest.mark.parametrize("chunked", [True, False])
def test_tokens_are_counted_across_cut_events_and_an_error_event_fails_the_request(chunked):
    from expertmesh.bench.serve import one_request
    tokens = b"".join(_event({"id": "c", "choices": [{"text": f"t{i}"}]}) for i in range(5))
    failing = tokens[:2 * len(tokens) // 5] + _event({"error": {"message": "step failed: gone"}})

    async def fetch(body: bytes):
        server = await _sse_server(body, pieces=7, chunked=chunked)
        async with server:
            return await one_request(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", [1, 2, 3], 5)

    done = asyncio.run(fetch(tokens + b"data: [DONE]\n\n"))
    assert done.error is None and done.output_tokens == 5 and 0 < done.ttft_s <= done.latency_s
    failed = asyncio.run(fetch(failing))
    assert failed.error == "step failed: gone" and failed.output_tokens == 2


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of the next HTTP request on the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length")), 0)
    return head, await reader.readexactly(length)


def _recording_server(body_of_token: bytes = _event({"choices": [{"text": "x"}]})):
    """A server that answers /metrics at once and each completion with max_tokens events (then closes), recording
    the prompts it saw and the most completions it had open at once."""
    seen, open_now, peak = [], [0], [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await _read_request(reader)
        if head.startswith(b"POST /v1/completions"):
            request = json.loads(body)
            seen.append(tuple(request["prompt"]))
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            for _ in range(request["max_tokens"]):
                writer.write(body_of_token)
                await writer.drain()
                await asyncio.sleep(0.001)  # requests overlap, as a real server's streams do
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
            open_now[0] -= 1
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    return asyncio.start_server(handle, "127.0.0.1", 0), seen, peak


def _run_against(workload: Workload, server_and_records) -> tuple:
    starting, seen, peak = server_and_records

    async def main():
        server = await starting
        async with server:
            url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            return await asyncio.wait_for(run(url, workload, progress=None), 30)

    return asyncio.run(main()), sorted(seen), peak[0]


@pytest.fixture
def no_settle(monkeypatch):
    from expertmesh.bench import serve
    monkeypatch.setattr(serve, "STATUS_SETTLE_S", 0.0)  # no gateway here whose counters would need to settle


@pytest.mark.parametrize("processes, rate", [(3, None), (2, 500.0)])
def test_client_processes_send_the_same_workload_once(no_settle, processes, rate):
    """The same seeded requests as one process sends, each exactly once, at most `concurrency` in flight in all."""
    workload = Workload(num_requests=40, input_len=(1, 6), output_len=(1, 4), concurrency=5, rate=rate, seed=3)
    one, seen_one, _ = _run_against(workload, _recording_server())
    several, seen, peak = _run_against(dataclasses.replace(workload, client_processes=processes), _recording_server())
    assert len(seen_one) == 40 and seen == seen_one
    assert several.requests == 40 and several.failed == 0 and several.output_tokens == one.output_tokens
    assert several.client_cpu_s > 0 and several.duration_s > 0
    if rate is None:
        assert peak <= workload.concurrency


def test_client_processes_keep_the_whole_concurrency_in_flight(no_settle):
    """Their shares of the concurrency add up to it: 3 processes hold 12 in flight together."""
    async def main():
        server, peak = await _serve_once_all_are_open(12)
        async with server:
            workload = Workload(num_requests=12, input_len=(2, 4), output_len=(1, 1), concurrency=12,
                                client_processes=3)
            report = await asyncio.wait_for(run(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", workload,
                                                progress=None), 30)
        return report, peak[0]

    report, peak = asyncio.run(main())
    assert peak == 12 and report.failed == 0 and report.output_tokens == 12


def test_client_processes_share_one_queue_of_jobs(no_settle):
    """A slow request holds only its own slot: the other process's slot sends every other job meanwhile (with a
    fixed share of the jobs each, the jobs queued behind the slow one would wait for it, and this server never
    ends the slow one until the rest are done)."""
    total = 10
    async def main():
        done, first, order = [0], [None], []
        rest_done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head, body = await _read_request(reader)
            if head.startswith(b"POST /v1/completions"):
                prompt = tuple(json.loads(body)["prompt"])
                if first[0] is None:
                    first[0] = prompt
                    await rest_done.wait()
                order.append(prompt)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                             b'data: {"choices": [{"text": "x"}]}\n\ndata: [DONE]\n\n')
                if prompt != first[0]:
                    done[0] += 1
                    if done[0] == total - 1:
                        rest_done.set()
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            workload = Workload(num_requests=total, input_len=(3, 3), output_len=(1, 1), concurrency=2,
                                client_processes=2)
            report = await asyncio.wait_for(run(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", workload,
                                                progress=None), 30)
        return report, order, first[0]

    report, order, slow = asyncio.run(main())
    assert report.failed == 0 and report.requests == total and order[-1] == slow


def test_a_client_process_that_crashes_raises_rather_than_hangs(no_settle):
    """A malformed error event makes the client code raise (a bug in it, or a server's): in a worker process, the
    parent names that worker and its exit code instead of waiting for its results."""
    workload = Workload(num_requests=6, input_len=(1, 2), output_len=(2, 2), concurrency=2, client_processes=2)
    with pytest.raises(RuntimeError, match=r"client process \d ended with exit code 1"):
        _run_against(workload, _recording_server(b'data: {"error": not json}\n\n'))


def test_client_processes_are_checked():
    with pytest.raises(ValueError, match="at least 1"):
        asyncio.run(run("http://127.0.0.1:1", Workload(client_processes=0)))
    with pytest.raises(ValueError, match="above a concurrency of 2"):
        asyncio.run(run("http://127.0.0.1:1", Workload(concurrency=2, client_processes=3)))
    Workload(concurrency=2, rate=10.0, client_processes=3).check()  # open loop: no concurrency to share


def test_the_client_runs_on_uvloop(monkeypatch):
    """bench serve's client streams every token through its event loop: on asyncio's own loop it took twice the
    CPU per token against a stand-in server (benchmarks/client_cpu.py)."""
    import uvloop

    from expertmesh.bench import serve
    loops = []

    async def fake_run(url, workload, trace_path=None):
        loops.append(type(asyncio.get_running_loop()))
        raise KeyboardInterrupt  # no cluster: the loop it ran on is all this test wants

    monkeypatch.setattr(serve, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        serve.main("http://127.0.0.1:1", Workload(), None, None)
    assert loops == [uvloop.Loop]


def test_ttft_is_split_by_the_gateways_histograms():
    """The mean TTFT at the gateways and the mean wait at the nodes over the run, from the histograms' sums and
    counts moved between the scrapes before and after it; none where nothing was observed."""
    from expertmesh.bench import prometheus
    from expertmesh.bench.serve import histogram_mean_ms
    before = prometheus.parse("expertmesh_time_to_first_token_seconds_sum 1.0\n"
                              "expertmesh_time_to_first_token_seconds_count 10\n")
    after = prometheus.parse("expertmesh_time_to_first_token_seconds_sum 1.6\n"
                             "expertmesh_time_to_first_token_seconds_count 30\n"
                             "expertmesh_request_queue_time_seconds_count 0\n")
    moved = prometheus.delta(after, before)
    assert histogram_mean_ms(moved, "expertmesh_time_to_first_token_seconds") == pytest.approx(30.0)
    assert histogram_mean_ms(moved, "expertmesh_request_queue_time_seconds") is None
