"""The gateway's CPU per streamed token, alone: the real gateway process (`python -m expertmesh.gateway`, W workers)
between bench serve's closed-loop client and a stand-in attention node that answers the gateway's control protocol
and emits one token to every running request each step, as a GPU node at 45k tok/s does (RESULTS.md, fourteenth
session). Without a model to run, the host path is all there is to measure.

    python benchmarks/gateway_cpu.py [--requests 1536] [--tokens 100] [--concurrency 256] [--step-ms 5]
        [--workers 1] [--stream-interval 1] [--repeats 2] [--profile OUT.txt]"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import uvloop
import yaml

from expertmesh.bench import serve

ROOT = Path(__file__).resolve().parents[1]


def stand_in(address: str, step_s: float) -> None:
    """An attention node's control side, without a model: each step, a token to every running request."""
    from expertmesh.transport.protocol import (AbortRequest, AddRequest, SamplingParams, Status, StatusRequest,
                                               StepOutputs)
    from expertmesh.transport.zmq import ZmqTransport

    async def main() -> None:
        listener = await ZmqTransport().listen(address)
        running: dict[bytes, dict[str, int]] = {}  # per gateway peer: request id -> tokens left
        steps = 0

        async def step() -> None:
            nonlocal steps
            while True:
                await asyncio.sleep(step_s)
                steps += 1
                for peer, requests in running.items():
                    if not requests:
                        continue
                    ids = list(requests)
                    reasons = []
                    for rid in ids:
                        requests[rid] -= 1
                        reasons.append("length" if requests[rid] == 0 else None)
                    await listener.send(peer, StepOutputs(ids, [(steps + i) % 5000 + 300 for i in range(len(ids))],
                                                          reasons))
                    for rid, reason in zip(ids, reasons):
                        if reason:
                            del requests[rid]

        asyncio.ensure_future(step())
        while True:
            peer, message = await listener.recv()
            requests = running.setdefault(peer, {})
            if isinstance(message, StatusRequest):
                await listener.send(peer, Status(0, True, len(requests), 0, 0, 0, 0, steps, [], [], [],
                                                 process=os.getpid()))
            elif isinstance(message, AddRequest):
                requests[message.request_id] = SamplingParams.from_list(message.sampling).max_tokens
            elif isinstance(message, AbortRequest):
                requests.pop(message.request_id, None)

    uvloop.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_client(url: str, requests: int, tokens: int, concurrency: int) -> tuple[int, float, list]:
    jobs = [([5] * 64, tokens)] * requests
    counter = itertools.count()

    def take() -> int | None:
        i = next(counter)
        return i if i < len(jobs) else None

    start = time.perf_counter()
    results = uvloop.run(serve._pull(url, jobs, concurrency, take, lambda: None))
    return sum(r.output_tokens for _, r in results), time.perf_counter() - start, [r for _, r in results]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1536)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--stream-interval", type=int, default=1, help="gateway.stream_interval: tokens a chunk")
    p.add_argument("--profile", help="py-spy the (first) gateway process over the last repeat, raw, into this file")
    args = p.parse_args()
    address = f"tcp://127.0.0.1:{free_port()}"
    node = multiprocessing.get_context("spawn").Process(target=stand_in, args=(address, args.step_ms / 1e3),
                                                        daemon=True)
    node.start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = {"model": {"path": str(ROOT / "models/expertmesh-mini")},
                  "cluster": {"attention_nodes": 1, "expert_nodes": 0, "attention_addresses": [address]},
                  "gateway": {"host": "127.0.0.1", "port": port, "workers": args.workers,
                              "stream_interval": args.stream_interval}}
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=tmp) if args.workers > 1 else dict(os.environ)
        gateways = [subprocess.Popen([sys.executable, "-m", "expertmesh.gateway", "--config", str(path),
                                      "--index", str(i)], env=env) for i in range(args.workers)]
        url = f"http://127.0.0.1:{port}"
        # the client on the first core, the stand-in on the next (beside the client where cores are short), each
        # gateway on one of its own: what a gateway costs, not what it costs while sharing its core with the client
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) > args.workers:
            own = 2 if len(cores) >= args.workers + 2 else 1  # cores the client and the stand-in take
            os.sched_setaffinity(0, cores[:1])
            os.sched_setaffinity(node.pid, cores[own - 1:own])
            for i, g in enumerate(gateways):
                os.sched_setaffinity(g.pid, [cores[own + i % (len(cores) - own)]])
        try:
            deadline = time.monotonic() + 60
            while True:  # readiness: /health answers 200 once the gateway has heard the node
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if time.monotonic() > deadline or any(g.poll() is not None for g in gateways):
                        raise RuntimeError("the gateway did not become healthy")
                    time.sleep(0.2)
            run_client(url, 64, 8, 64)  # warm: connections, imports, first-request paths
            pids = [g.pid for g in gateways]
            for repeat in range(args.repeats):
                profiler = None
                if args.profile and repeat == args.repeats - 1:
                    profiler = subprocess.Popen(["py-spy", "record", "--format", "raw", "-o", args.profile,
                                                 "-p", str(pids[0]), "-r", "200"], stderr=subprocess.DEVNULL)
                each = [cpu_seconds([pid]) for pid in pids]
                tokens, seconds, results = run_client(url, args.requests, args.tokens, args.concurrency)
                each = [cpu_seconds([pid]) - before for pid, before in zip(pids, each)]
                cpu = sum(each)
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    profiler.wait()
                ttft = sorted(r.ttft_s for r in results)[len(results) // 2] * 1e3
                per_step = args.concurrency / args.step_ms * 1e3
                failed = [r.error for r in results if r.error]
                if failed:
                    print(f"{len(failed)} of {len(results)} requests failed, e.g. {failed[0]}")
                print(f"{args.workers} gateway(s): {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tok/s "
                      f"(the node's pace: {per_step:.0f}); gateway CPU {cpu / tokens * 1e6:.1f} us per token "
                      f"({min(each) / seconds:.0%}-{max(each) / seconds:.0%} of a core each); TTFT p50 {ttft:.1f} ms",
                      flush=True)
        finally:
            for g in gateways:
                g.terminate()
            for g in gateways:
                g.wait()
            node.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
