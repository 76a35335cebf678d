"""`bench serve`'s client against a minimal HTTP server of its own: the requests it keeps in flight are the
workload's concurrency, not its HTTP library's connection pool."""
from __future__ import annotations

import asyncio
import json

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
