"""bench serve's client CPU per streamed token, on asyncio's own event loop and on uvloop, against a stand-in server
in a process of its own that streams one completion event every 5 ms to each open response, as a gateway streams
the tokens of its steps (RESULTS.md, thirteenth session).

    python benchmarks/client_cpu.py [--requests 2048] [--tokens 100] [--concurrency 256]"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import socket
import time

import uvloop

from expertmesh.bench import serve

EVENT = (b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,'
         b'"text":" the","logprobs":null,"finish_reason":null}]}\n\n')


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def stand_in(listener: socket.socket, step_s: float) -> None:
    """Answers each POST with a chunked event stream of max_tokens events, one per step to every open stream."""
    streams: dict[int, list] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        body = json.loads(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        done = asyncio.Event()
        streams[id(writer)] = [writer, body["max_tokens"], done]
        await done.wait()
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def steps() -> None:
        while True:
            await asyncio.sleep(step_s)
            for key, stream in list(streams.items()):
                stream[0].write(_chunk(EVENT))
                stream[1] -= 1
                if stream[1] == 0:
                    del streams[key]
                    stream[2].set()

    async def main() -> None:
        server = await asyncio.start_server(handle, sock=listener, backlog=4096)
        asyncio.ensure_future(steps())
        await server.serve_forever()

    uvloop.run(main())


def client_cpu(url: str, requests: int, tokens: int, concurrency: int, loop: str) -> tuple[int, float, float]:
    """(tokens streamed, seconds, client CPU seconds) of one closed-loop run of serve._pull."""
    jobs = [([5] * 64, tokens)] * requests
    counter = itertools.count()

    def take() -> int | None:
        i = next(counter)
        return i if i < len(jobs) else None

    start, cpu = time.perf_counter(), time.process_time()
    run = uvloop.run if loop == "uvloop" else asyncio.run
    results = run(serve._pull(url, jobs, concurrency, take, lambda: None))
    return sum(r.output_tokens for _, r in results), time.perf_counter() - start, time.process_time() - cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    server = multiprocessing.get_context("spawn").Process(target=stand_in, args=(listener, args.step_ms / 1e3),
                                                          daemon=True)
    server.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        for _ in range(args.repeats):
            for loop in ("asyncio", "uvloop"):
                tokens, seconds, cpu = client_cpu(url, args.requests, args.tokens, args.concurrency, loop)
                print(f"{loop:<8} {tokens} tokens in {seconds:.1f} s: client CPU {cpu:.2f} s = "
                      f"{cpu / tokens * 1e6:.1f} us per token ({cpu / seconds:.0%} of a core)", flush=True)
    finally:
        server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
