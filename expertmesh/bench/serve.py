"""`expertmesh bench serve`: drives a running cluster over HTTP with a seeded synthetic workload and
reports throughput, TTFT/TPOT percentiles, bytes per generated token on each link and idle fractions."""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

from . import prometheus
from .http import HTTPError, fetch, request


@dataclass
class Workload:
    num_requests: int = 64
    input_len: tuple[int, int] = (16, 64)  # uniform range of prompt tokens
    output_len: tuple[int, int] = (16, 64)  # uniform range of generated tokens (ignore_eos)
    concurrency: int = 16  # requests in flight at once (closed loop) ...
    rate: float | None = None  # ... or requests per second (open loop, Poisson arrivals)
    seed: int = 0
    vocab_size: int = 256  # prompt token ids are drawn from [10, vocab_size)


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    latency_s: float
    error: str | None = None

    @property
    def tpot_s(self) -> float:
        return (self.latency_s - self.ttft_s) / max(1, self.output_tokens - 1)


STATUS_SETTLE_S = 0.6  # node counters reach the gateway by its 0.25 s status polls


@dataclass
class Report:
    requests: int
    failed: int
    duration_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    bytes_per_token: dict[str, float] = field(default_factory=dict)  # link "a0->e1" -> bytes sent per output token
    idle_fraction: dict[str, float] = field(default_factory=dict)  # host: 1 - timed phases / wall
    gpu_busy: dict[str, float] = field(default_factory=dict)  # device: compute spans' time / duration (CUDA events)
    gpu_span_ms: dict[str, float] = field(default_factory=dict)  # mean span: T_a per segment, T_e per round
    client_cpu_s: float = 0.0  # this client's own CPU time: near the duration, the client sets the pace
    tokens_per_node: dict[str, float] = field(default_factory=dict)  # attention node "a0" -> the tokens it generated
    steps_per_node: dict[str, list[float]] = field(default_factory=dict)  # "a0" -> [steps, those run eagerly]

    def table(self) -> str:
        rows = [("requests (failed)", f"{self.requests} ({self.failed})"), ("duration", f"{self.duration_s:.2f} s"),
                ("output tokens/s", f"{self.output_tokens_per_s:.1f}"),
                ("TTFT p50 / p99", f"{self.ttft_ms['p50']:.1f} / {self.ttft_ms['p99']:.1f} ms"),
                ("TPOT p50 / p99", f"{self.tpot_ms['p50']:.2f} / {self.tpot_ms['p99']:.2f} ms")]
        rows += [(f"bytes/token {link}", f"{value:.0f}") for link, value in sorted(self.bytes_per_token.items())]
        rows += [(f"idle {node}", f"{value:.1%}") for node, value in sorted(self.idle_fraction.items())]
        rows += [(f"GPU busy {node}", f"{value:.1%} ({self.gpu_span_ms[node]:.3f} ms per span)")
                 for node, value in sorted(self.gpu_busy.items())]
        rows += [(f"tokens {node}", f"{value:.0f} ({value / max(1, sum(self.tokens_per_node.values())):.0%})")
                 for node, value in sorted(self.tokens_per_node.items())]
        rows += [(f"steps {node}", f"{steps:.0f} ({eager / max(1, steps):.0%} eager)")
                 for node, (steps, eager) in sorted(self.steps_per_node.items())]
        if self.duration_s > 0:
            rows.append(("client CPU", f"{self.client_cpu_s / self.duration_s:.0%} of the run"
                         + (" (near 100%: the client, not the cluster, may set the pace)"
                            if self.client_cpu_s > 0.8 * self.duration_s else "")))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan")}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return {"p50": pick(0.5) * 1e3, "p99": pick(0.99) * 1e3, "mean": sum(values) / len(values) * 1e3}


REQUEST_TIMEOUT_S = 600.0


async def one_request(url: str, prompt: list[int], max_tokens: int) -> RequestResult:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                       "stream": True}).encode()
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S), request(url, "POST", "/v1/completions", body) as response:
            if response.status != 200:
                return RequestResult(len(prompt), 0, 0.0, 0.0, f"HTTP {response.status}")
            # events split as bytes, JSON parsed only for an error: decoding and parsing every event is most of a
            # client's CPU at 10k tok/s and more
            pending = b""
            async for data in response.chunks():
                *events, pending = (pending + data).split(b"\n\n")
                for event in events:
                    if event.startswith(b'data: {"error"'):
                        return RequestResult(len(prompt), tokens, 0.0, 0.0, json.loads(event[6:])["error"]["message"])
                    if event.startswith(b"data: {"):  # one event per generated token; not [DONE]
                        tokens += 1
                        if first is None:
                            first = time.perf_counter() - start
    except HTTPError as exc:
        return RequestResult(len(prompt), tokens, 0.0, 0.0, str(exc))
    except TimeoutError:
        return RequestResult(len(prompt), tokens, 0.0, 0.0, f"no end within {REQUEST_TIMEOUT_S} s")
    return RequestResult(len(prompt), tokens, first or 0.0, time.perf_counter() - start)


async def run(url: str, workload: Workload, trace_path: str | None = None, progress=sys.stderr) -> Report:
    rng = random.Random(workload.seed)
    jobs = [([rng.randrange(10, workload.vocab_size) for _ in range(rng.randint(*workload.input_len))],
             rng.randint(*workload.output_len)) for _ in range(workload.num_requests)]
    arrivals = []
    t = 0.0
    for _ in jobs:
        arrivals.append(t)
        if workload.rate:
            t += rng.expovariate(workload.rate)
    await asyncio.sleep(STATUS_SETTLE_S)  # earlier work's counters in too, or its tail counts as this run's
    before = prometheus.parse((await fetch(url, "GET", "/metrics"))[1].decode())
    if trace_path:
        await fetch(url, "POST", "/admin/trace/start")
    # a connection per request in flight, none pooled: httpx, used before, pooled at most 100, and the rest waited
    # in the client, uncounted in flight and counted in their TTFT (seen at 256 in flight: TTFT 1.2 s with the
    # nodes mostly idle)
    semaphore = asyncio.Semaphore(workload.concurrency if not workload.rate else len(jobs))
    done = 0
    start, cpu_start = time.perf_counter(), time.process_time()

    async def job(i: int) -> RequestResult:
        nonlocal done
        await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
        async with semaphore:
            result = await one_request(url, *jobs[i])
        done += 1
        if progress is not None and (done % max(1, len(jobs) // 10) == 0 or done == len(jobs)):
            print(f"bench serve: {done}/{len(jobs)} requests done", file=progress, flush=True)
        return result

    results = await asyncio.gather(*(job(i) for i in range(len(jobs))))
    duration = time.perf_counter() - start
    client_cpu_s = time.process_time() - cpu_start
    if trace_path:
        trace = json.loads((await fetch(url, "POST", "/admin/trace/stop"))[1])
        with open(trace_path, "w") as handle:
            json.dump(trace, handle)
    await asyncio.sleep(STATUS_SETTLE_S)
    after = prometheus.parse((await fetch(url, "GET", "/metrics"))[1].decode())
    moved = prometheus.delta(after, before)
    ok = [r for r in results if r.error is None]
    output_tokens = sum(r.output_tokens for r in ok)
    links = prometheus.by_label(moved, "expertmesh_link_bytes_sent_total", "attention_node", "expert_node")
    received = prometheus.by_label(moved, "expertmesh_link_bytes_received_total", "attention_node", "expert_node")
    bytes_per_token = {f"a{a}->e{e}": value / max(1, output_tokens) for (a, e), value in links.items()}
    bytes_per_token.update({f"e{e}->a{a}": value / max(1, output_tokens) for (a, e), value in received.items()})
    return Report(len(results), len(results) - len(ok), duration, output_tokens, output_tokens / duration,
                  percentiles([r.ttft_s for r in ok]), percentiles([r.tpot_s for r in ok if r.output_tokens > 1]),
                  bytes_per_token, prometheus.idle_fractions(moved), *prometheus.gpu_busy(moved, duration),
                  client_cpu_s=client_cpu_s,
                  tokens_per_node={f"a{a}": value for (a,), value in prometheus.by_label(
                      moved, "expertmesh_node_generation_tokens_total", "attention_node").items()},
                  steps_per_node=steps_per_node(moved))


def steps_per_node(moved: dict) -> dict[str, list[float]]:
    """Each attention node's steps in the run, and how many of them ran eagerly."""
    steps = prometheus.by_label(moved, "expertmesh_engine_steps_total", "attention_node")
    eager = prometheus.by_label(moved, "expertmesh_engine_eager_steps_total", "attention_node")
    return {f"a{a}": [value, eager.get((a,), 0.0)] for (a,), value in steps.items()}


def main(url: str, workload: Workload, trace_path: str | None, json_path: str | None) -> int:
    report = asyncio.run(run(url, workload, trace_path))
    print(report.table())
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"workload": asdict(workload), "report": asdict(report)}, handle, indent=2)
    return 0 if report.failed == 0 else 1
