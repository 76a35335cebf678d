"""`expertmesh bench serve`: drives a running cluster over HTTP with a seeded synthetic workload and
reports throughput, TTFT/TPOT percentiles, bytes per generated token on each link and idle fractions."""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait as wait_any

import uvloop

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
    # client processes sending the requests: one tops out near 50k streamed tokens/s (15-28 us of CPU per token)
    client_processes: int = 1

    def check(self) -> None:
        if self.client_processes < 1:
            raise ValueError(f"client processes must be at least 1, not {self.client_processes}")
        if not self.rate and self.client_processes > self.concurrency:
            raise ValueError(f"{self.client_processes} client processes above a concurrency of {self.concurrency}: "
                             "each process keeps at least one request in flight")


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
    client_cpu_s: float = 0.0  # the client's own CPU time (all its processes): near the duration, it sets the pace
    tokens_per_node: dict[str, float] = field(default_factory=dict)  # attention node "a0" -> the tokens it generated
    steps_per_node: dict[str, list[float]] = field(default_factory=dict)  # "a0" -> [steps, those run eagerly]
    client_processes: int = 1  # processes the client ran in (client_cpu_s adds theirs up)
    # where the client's TTFT went, means over the run from the gateways' histograms (all gateway processes): from
    # a request's arrival at a gateway to its first token there, and the part it waited at its attention node
    # before its first step (the rest of TTFT: the client, the gateway and the steps until the first token)
    gateway_ttft_ms: float | None = None
    node_queue_ms: float | None = None

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
        if self.gateway_ttft_ms is not None:
            rows.append(("TTFT mean: client / gateway / node queue", f"{self.ttft_ms['mean']:.1f} / "
                         f"{self.gateway_ttft_ms:.1f} / {self.node_queue_ms or 0.0:.1f} ms"))
        if self.duration_s > 0:
            share = self.client_cpu_s / self.duration_s / self.client_processes  # each process: one core at most
            rows.append(("client CPU", f"{share:.0%} of the run"
                         + (f" per process ({self.client_processes})" if self.client_processes > 1 else "")
                         + (" (near 100%: the client, not the cluster, may set the pace)" if share > 0.8 else "")))
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
    # include_usage: a chunk may carry several tokens (a gateway behind its nodes merges what queued up), so the
    # count is the last event's usage, not the events
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
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
                    if event.startswith(b"data: {"):  # not [DONE]
                        if b'"choices": []' in event or b'"choices":[]' in event:  # the usage, last
                            tokens = json.loads(event[6:])["usage"]["completion_tokens"]
                        else:
                            tokens += 1  # at least one token: what a stream that ends without usage reports
                            if first is None:
                                first = time.perf_counter() - start
    except HTTPError as exc:
        return RequestResult(len(prompt), tokens, 0.0, 0.0, str(exc))
    except TimeoutError:
        return RequestResult(len(prompt), tokens, 0.0, 0.0, f"no end within {REQUEST_TIMEOUT_S} s")
    return RequestResult(len(prompt), tokens, first or 0.0, time.perf_counter() - start)


async def run(url: str, workload: Workload, trace_path: str | None = None, progress=sys.stderr) -> Report:
    workload.check()
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
    processes = min(workload.client_processes, len(jobs))
    if processes > 1:
        results, duration, client_cpu_s = await _send_in_processes(url, workload, jobs, arrivals, processes, progress)
    else:
        shown = _Progress(len(jobs), progress)
        start, cpu_start = time.perf_counter(), time.process_time()
        results = await _send(url, jobs, arrivals, workload.concurrency if not workload.rate else len(jobs),
                              shown.update)
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
                  steps_per_node=steps_per_node(moved), client_processes=max(1, processes),
                  gateway_ttft_ms=histogram_mean_ms(moved, "expertmesh_time_to_first_token_seconds"),
                  node_queue_ms=histogram_mean_ms(moved, "expertmesh_request_queue_time_seconds"))


async def _send(url: str, jobs: list, arrivals: list[float], concurrency: int, on_done) -> list[RequestResult]:
    """Sends each job at its arrival time (s from now), at most `concurrency` in flight; on_done(requests done)."""
    # a connection per request in flight, none pooled: httpx, used before, pooled at most 100, and the rest waited
    # in the client, uncounted in flight and counted in their TTFT (seen at 256 in flight: TTFT 1.2 s with the
    # nodes mostly idle)
    semaphore = asyncio.Semaphore(concurrency)
    done = 0
    start = time.perf_counter()

    async def job(i: int) -> RequestResult:
        nonlocal done
        await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
        async with semaphore:
            result = await one_request(url, *jobs[i])
        done += 1
        on_done(done)
        return result

    return await asyncio.gather(*(job(i) for i in range(len(jobs))))


class _Progress:
    """Prints "k/n requests done" about every tenth of the requests."""

    def __init__(self, total: int, out) -> None:
        self.total, self.out, self.shown = total, out, 0
        self.step = max(1, total // 10)

    def update(self, done: int) -> None:
        if self.out is not None and done > self.shown and (done // self.step > self.shown // self.step
                                                           or done == self.total):
            print(f"bench serve: {done}/{self.total} requests done", file=self.out, flush=True)
            self.shown = done


async def _pull(url: str, jobs: list, concurrency: int, take, on_done) -> list[tuple[int, RequestResult]]:
    """A closed loop over jobs shared with other processes: each of `concurrency` slots sends the next job that
    take() hands out (its index, None once none is left), so every slot stays busy until the jobs run out, as one
    process's loop does. Returns (index, result) of the jobs this process sent."""
    results = []

    async def slot() -> None:
        while (i := take()) is not None:
            results.append((i, await one_request(url, *jobs[i])))
            on_done()

    await asyncio.gather(*(slot() for _ in range(concurrency)))
    return results


def _client_process(url: str, jobs: list, arrivals: list[float], concurrency: int, conn, done, next_job,
                    share: tuple[int, int]) -> None:
    """One of several client processes: says it is ready, waits for the go, sends jobs and sends back ([(index,
    result)], its CPU seconds). Closed loop: jobs taken in order from next_job, shared by all the processes; open
    loop (next_job None): the jobs share=(k, n) names, i = k, k + n, ..., each at its arrival time. The go comes
    over the pipe, not an Event: a parent that died ends the wait."""
    def count(*_) -> None:
        with done.get_lock():
            done.value += 1

    def take() -> int | None:
        with next_job.get_lock():
            i = next_job.value
            next_job.value = i + 1
        return i if i < len(jobs) else None

    conn.send("ready")
    conn.recv()
    cpu_start = time.process_time()
    if next_job is not None:
        results = uvloop.run(_pull(url, jobs, concurrency, take, count))
    else:
        k, n = share
        ours = list(range(k, len(jobs), n))
        sent = uvloop.run(_send(url, [jobs[i] for i in ours], [arrivals[i] for i in ours], len(ours), count))
        results = list(zip(ours, sent))
    conn.send((results, time.process_time() - cpu_start))


def _receive(conns: list, processes: list, waiting: set[int], timeout: float) -> dict[int, object]:
    """The next message of each worker in `waiting` that has one within `timeout` s. A worker that ended without
    sending it (it crashed) raises, rather than leaving the parent waiting forever."""
    wait_any([conns[k] for k in waiting] + [processes[k].sentinel for k in waiting], timeout)
    messages = {}
    for k in sorted(waiting):
        alive = processes[k].is_alive()  # before the poll: a worker that sent and then ended has its message read
        try:
            if conns[k].poll():
                messages[k] = conns[k].recv()
                continue
        except EOFError:  # its end of the pipe closed: it ended
            alive = False
        if not alive:
            processes[k].join()
            raise RuntimeError(f"bench serve: client process {k} ended with exit code {processes[k].exitcode} "
                               "before sending its results")
    return messages


async def _send_in_processes(url: str, workload: Workload, jobs: list, arrivals: list[float], n: int,
                             progress) -> tuple[list[RequestResult], float, float]:
    """The jobs over `n` client processes. Closed loop: the concurrency split as evenly as possible, every process
    taking the next job from one shared counter (a fixed share each left slots idle at the end while another
    process still had jobs); open loop: job i to process i % n, at its arrival time. Returns (results in the order
    of `jobs`, duration, client CPU seconds of all processes)."""
    context = multiprocessing.get_context("spawn")  # no fork of a parent that runs an event loop (and its threads)
    done = context.Value("q", 0)  # requests done in all the processes, for the progress lines
    next_job = None if workload.rate else context.Value("q", 0)
    conns, processes = [], []
    try:
        for k in range(n):
            concurrency = workload.concurrency // n + (k < workload.concurrency % n)
            ours, theirs = context.Pipe()
            process = context.Process(target=_client_process, name=f"bench-serve-client-{k}", daemon=True,
                                      args=(url, jobs, arrivals, concurrency, theirs, done, next_job, (k, n)))
            process.start()
            theirs.close()  # its end only in the worker: the end closing tells that the worker ended
            conns.append(ours)
            processes.append(process)
        # the clock starts once every worker has started (imports done) and waits: none of that counts in the run
        waiting = set(range(n))
        while waiting:
            waiting -= set(await asyncio.to_thread(_receive, conns, processes, waiting, 1.0))
        shown = _Progress(len(jobs), progress)
        start, cpu_start = time.perf_counter(), time.process_time()
        for conn in conns:
            conn.send("go")
        shares, waiting = {}, set(range(n))
        while waiting:  # the event loop stays free (a caller may serve on it); progress polled meanwhile
            received = await asyncio.to_thread(_receive, conns, processes, waiting, 0.25)
            shares.update(received)
            waiting -= set(received)
            shown.update(done.value)
        duration = time.perf_counter() - start
        client_cpu_s = time.process_time() - cpu_start + sum(cpu for _, cpu in shares.values())
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        for conn in conns:
            conn.close()
    results = dict(pair for share, _ in shares.values() for pair in share)
    return [results[i] for i in range(len(jobs))], duration, client_cpu_s


def histogram_mean_ms(moved: dict, name: str) -> float | None:
    """The mean of a histogram's observations in the run (its _sum and _count moved), in ms; None without any."""
    count = moved.get((f"{name}_count", ()), 0.0)
    return moved.get((f"{name}_sum", ()), 0.0) / count * 1e3 if count > 0 else None


def steps_per_node(moved: dict) -> dict[str, list[float]]:
    """Each attention node's steps in the run, and how many of them ran eagerly."""
    steps = prometheus.by_label(moved, "expertmesh_engine_steps_total", "attention_node")
    eager = prometheus.by_label(moved, "expertmesh_engine_eager_steps_total", "attention_node")
    return {f"a{a}": [value, eager.get((a,), 0.0)] for (a,), value in steps.items()}


def main(url: str, workload: Workload, trace_path: str | None, json_path: str | None) -> int:
    # uvloop, as the gateway's uvicorn: a client on asyncio's own loop took 25-28 us of CPU per streamed token
    # against a stand-in server, 13-14 on uvloop (benchmarks/client_cpu.py; RESULTS.md, thirteenth session)
    report = uvloop.run(run(url, workload, trace_path))
    print(report.table())
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"workload": asdict(workload), "report": asdict(report)}, handle, indent=2)
    return 0 if report.failed == 0 else 1
