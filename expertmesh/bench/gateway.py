"""`expertmesh bench gateway`: the gateway's CPU per streamed token on this host, without a model or a GPU.

The real gateway processes (`python -m expertmesh.gateway`, --workers of them) sit between `bench serve`'s closed-loop
client and a stand-in attention node, which answers the gateway's control protocol and sends one token to every
running request each --step-ms, as a GPU node does, drawn from the --model's vocabulary: its tokenizer is part of
what a token costs the gateway (benchmarks/RESULTS.md, sixteenth session). The gateways' CPU seconds (/proc) over the
tokens they streamed is what the planner sizes the gateway by (Calibration.gateway_us_per_token,
perf.gateway_workers): measured on the host at hand, as `bench layer` measures the GPU. The served rows' split
applies: GATEWAY_US_PER_MESSAGE a step message, the rest by token. Each call of the device tool lands on another
machine, whose host may take 20% more CPU a token (benchmarks/RESULTS.md, fourteenth session)."""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ..launcher import ClusterError
from ..launcher.local import Child
from ..launcher.node_host import cpu_seconds, free_port, reap
from ..launcher.supervision import wait_healthy
from ..planner.calibration import bench_gateway_costs
from ..planner.served import GATEWAY_US_PER_MESSAGE
from . import serve

READY_S = 60.0
STOP_S = 10.0


@dataclass
class GatewayRun:
    workers: int
    client_processes: int
    tokens: int
    seconds: float
    tokens_per_s: float
    pace_tokens_per_s: float  # the stand-in's: concurrency tokens each step
    cpu_s: list[float]  # per gateway process
    messages: int  # step messages the stand-in sent (one a step to each gateway process with requests in it)
    us_per_token: float  # CPU a token once each message's GATEWAY_US_PER_MESSAGE is taken out
    us_per_message: float
    ttft_ms_p50: float
    failed: int

    def line(self) -> str:
        busy = [cpu / self.seconds for cpu in self.cpu_s]
        return (f"{self.workers} gateway(s), {self.client_processes} client process(es): {self.tokens} tokens in "
                f"{self.seconds:.1f} s = {self.tokens_per_s:.0f} tok/s (the node's pace {self.pace_tokens_per_s:.0f}); "
                f"gateway CPU {sum(self.cpu_s) / max(1, self.tokens) * 1e6:.1f} us a token in all, "
                f"{self.us_per_token:.1f} beside {self.us_per_message:.0f} a message; each "
                f"{min(busy):.0%}-{max(busy):.0%} of a core; TTFT p50 {self.ttft_ms_p50:.1f} ms"
                + (f"; {self.failed} requests failed" if self.failed else ""))


def stand_in(address: str, step_s: float, messages, vocab_size: int) -> None:
    """An attention node's control side, without a model: each step, a token to every running request, drawn at
    random from the vocabulary (a random-weight model's picks spread over it; the gateway detokenizes each)."""
    import random

    import uvloop

    from ..transport.protocol import AbortRequest, AddRequest, SamplingParams, Status, StatusRequest, StepOutputs
    from ..transport.zmq import ZmqTransport

    async def main() -> None:
        listener = await ZmqTransport().listen(address)
        running: dict[bytes, dict[str, int]] = {}  # per gateway peer: request id -> tokens left
        steps = 0
        pick = random.Random(0)

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
                    await listener.send(peer, StepOutputs(ids, [pick.randrange(2, vocab_size) for _ in ids], reasons))
                    messages.value += 1
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


def vocab_size(model: str) -> int:
    """The checkpoint's vocabulary (config.json), which the stand-in draws its tokens from."""
    try:
        return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{model!r} has no config.json with a vocab_size: {exc}") from exc


def measure(model: str, workers: int = 4, requests: int = 2048, tokens: int = 96, concurrency: int = 256,
            step_ms: float = 4.5, stream_interval: int = 1, client_processes: int = 1, repeats: int = 2,
            profile: str | None = None, progress=sys.stderr) -> list[GatewayRun]:
    """`repeats` runs of `requests` requests of `tokens` output tokens, `concurrency` in flight, through `workers`
    fresh gateway processes; profile: py-spy the first gateway over the last run into this file (raw)."""
    for name, value in (("workers", workers), ("requests", requests), ("tokens", tokens),
                        ("concurrency", concurrency), ("client processes", client_processes), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    if step_ms <= 0:
        raise ValueError(f"the step must be longer than 0 ms, not {step_ms}")
    context = multiprocessing.get_context("spawn")
    messages = context.Value("q", 0)
    address = f"tcp://127.0.0.1:{free_port()}"
    node = context.Process(target=stand_in, args=(address, step_ms / 1e3, messages, vocab_size(model)), daemon=True)
    node.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        config = {"model": {"path": model},
                  "cluster": {"attention_nodes": 1, "expert_nodes": 0, "attention_addresses": [address]},
                  "gateway": {"host": "127.0.0.1", "port": port, "workers": workers,
                              "stream_interval": stream_interval}}
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=tmp) if workers > 1 else dict(os.environ)
        commands = [[sys.executable, "-m", "expertmesh.gateway", "--config", str(path), "--index", str(i)]
                    for i in range(workers)]
        gateways = [Child(f"gateway {i}", subprocess.Popen(command, env=env), command, env=env)
                    for i, command in enumerate(commands)]
        try:
            wait_healthy(url, gateways, READY_S, workers)  # every process serving, so none takes the first burst alone
            warm = serve.Workload(min(64, requests), (64, 64), (8, 8), min(64, concurrency))
            with open(os.devnull, "w") as quiet:  # connections, imports, first-request paths
                asyncio.run(serve.run(url, warm, progress=quiet))
            for repeat in range(repeats):
                profiler = None
                if profile and repeat == repeats - 1:
                    profiler = subprocess.Popen(["py-spy", "record", "--format", "raw", "-o", profile,
                                                 "-p", str(gateways[0].process.pid), "-r", "200"], stderr=subprocess.DEVNULL)
                cpu_before = [cpu_seconds(g.process.pid) for g in gateways]
                sent_before = messages.value
                workload = serve.Workload(requests, (64, 64), (tokens, tokens), concurrency,
                                          client_processes=client_processes)
                report = asyncio.run(serve.run(url, workload, progress=progress))
                cpu = [cpu_seconds(g.process.pid) - before for g, before in zip(gateways, cpu_before)]
                sent = messages.value - sent_before
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    profiler.wait()
                per_message = GATEWAY_US_PER_MESSAGE if sent else 0.0
                per_token = max(0.0, sum(cpu) * 1e6 - sent * per_message) / max(1, report.output_tokens)
                runs.append(GatewayRun(workers, report.client_processes, report.output_tokens, report.duration_s,
                                       report.output_tokens_per_s, concurrency / step_ms * 1e3, cpu, sent, per_token,
                                       per_message, report.ttft_ms["p50"], report.failed))
                print(runs[-1].line(), file=progress, flush=True)
        finally:
            for g in gateways:
                g.process.terminate()
            for g in gateways:
                reap(g.process, g.name, STOP_S, STOP_S)
            node.kill()
    return runs


def main(args: argparse.Namespace) -> int:
    try:
        runs = measure(args.model, args.workers, args.requests, args.tokens, args.concurrency, args.step_ms,
                       args.stream_interval, args.client_processes, args.repeats, args.profile)
    except (ValueError, ClusterError) as exc:
        print(f"expertmesh bench gateway: {exc}", file=sys.stderr)
        return 1
    per_token, per_message = bench_gateway_costs([asdict(r) for r in runs])
    print(f"gateway CPU: {per_token:.1f} us a token and {per_message:.0f} a step message (median of {len(runs)} "
          f"run{'s' if len(runs) != 1 else ''}; a calibration file's bench_gateway entry takes them)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "func"},
                                               "cpus": len(os.sched_getaffinity(0)),
                                               "runs": [asdict(r) for r in runs]}, indent=1))
    return 0
