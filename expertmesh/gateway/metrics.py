"""The gateway's /metrics, through prometheus-client: its own counters and the latency histograms a vLLM user looks
for (time to first token, time per output token, end to end, queue time), and every node's status as of its last
poll. Several gateway processes on one port (gateway.workers) share their counters and histograms through
prometheus-client's multiprocess mode: the launcher gives them one PROMETHEUS_MULTIPROC_DIR, and whichever process
answers a scrape reports the sums of all (each process alone reported its own share, a different one at each
scrape). The semantic router's decision counters stay per process."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's: where each process keeps its values

from .nodes import AttentionNodeClient, NodeLink

disable_created_metrics()  # no *_created series beside every counter and histogram

# vLLM's buckets for the same three histograms (seconds)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0)
_REQUESTS_HELP, _PROMPT_HELP = "Requests by outcome", "Prompt tokens admitted"
_GENERATION_HELP, _IN_FLIGHT_HELP = "Tokens generated", "Requests admitted, not finished"
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class _SharedCounts(Counter):
    """requests by outcome that also adds each increment to a prometheus-client counter shared between processes."""

    def __init__(self, shared: PromCounter) -> None:
        super().__init__()
        self.shared = shared

    def __setitem__(self, key, value) -> None:
        self.shared.labels(key).inc(value - self[key])
        super().__setitem__(key, value)


@dataclass
class GatewayMetrics:
    requests: Counter = field(default_factory=Counter)  # by outcome: completed, failed, rejected, aborted, timed_out
    prompt_tokens: int = 0
    generation_tokens: int = 0
    in_flight: int = 0
    in_flight_tokens: int = 0  # prompt tokens of the requests in flight

    def __post_init__(self) -> None:
        # one registry per gateway (tests run several in a process); with several processes, their shared values
        # (one file per process in MULTIPROCESS_DIR), summed at each scrape
        self.multiprocess_dir = os.environ.get(MULTIPROCESS_DIR)
        self.registry = CollectorRegistry()
        own = None if self.multiprocess_dir else self.registry  # shared values are collected from their files
        self.ttft = Histogram("expertmesh_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_TTFT_BUCKETS, registry=own)
        self.tpot = Histogram("expertmesh_time_per_output_token_seconds", "Time between output tokens after the first",
                              buckets=_TPOT_BUCKETS, registry=own)
        self.e2e = Histogram("expertmesh_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_E2E_BUCKETS, registry=own)
        # vLLM's request_queue_time: measured by the attention node, the part of TTFT spent waiting for a batch
        # slot, token budget or KV blocks (so TTFT's buckets)
        self.queue_time = Histogram("expertmesh_request_queue_time_seconds", "Time a request waited at its "
                                    "attention node, from its arrival there to its first step",
                                    buckets=_TTFT_BUCKETS, registry=own)
        if self.multiprocess_dir:
            self.requests = _SharedCounts(PromCounter("expertmesh_requests", _REQUESTS_HELP, ["outcome"],
                                                      registry=None))
            self._shared = {"prompt_tokens": PromCounter("expertmesh_prompt_tokens", _PROMPT_HELP, registry=None),
                            "generation_tokens": PromCounter("expertmesh_generation_tokens", _GENERATION_HELP,
                                                             registry=None),
                            "in_flight": Gauge("expertmesh_requests_in_flight", _IN_FLIGHT_HELP, registry=None,
                                               multiprocess_mode="livesum")}
            MultiProcessCollector(self.registry, path=self.multiprocess_dir)
            self.__class__ = _SharedGatewayMetrics  # one process alone keeps plain attributes on its token path
        self._sources: tuple = ([], [], None)
        self.registry.register(_Snapshot(self))

    def observe(self, first_token_s: float | None, done_s: float, output_tokens: int) -> None:
        """A finished request's latencies, in seconds since it arrived."""
        if first_token_s is None:
            return
        self.ttft.observe(first_token_s)
        self.e2e.observe(done_s)
        if output_tokens > 1:
            self.tpot.observe((done_s - first_token_s) / (output_tokens - 1))

    def render(self, nodes: list[AttentionNodeClient], expert_nodes: list[NodeLink], routing=None) -> bytes:
        self._sources = (nodes, expert_nodes, routing)
        return generate_latest(self.registry)


class _SharedGatewayMetrics(GatewayMetrics):
    """GatewayMetrics whose counts and in-flight gauge are mirrored into the values the gateway processes share."""

    def __setattr__(self, name: str, value) -> None:
        shared = self._shared
        if name in shared:
            if name == "in_flight":
                shared[name].set(value)
            else:
                shared[name].inc(value - self.__dict__[name])
        super().__setattr__(name, value)


class _Snapshot:
    """Collects, at scrape time, the gateway's counters and each node's last status."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        nodes, expert_nodes, routing = m._sources
        if not m.multiprocess_dir:  # else the processes' shared values (MultiProcessCollector)
            requests = CounterMetricFamily("expertmesh_requests", _REQUESTS_HELP, labels=["outcome"])
            for outcome in ("completed", "failed", "rejected", "aborted", "timed_out"):
                requests.add_metric([outcome], m.requests[outcome])
            yield requests
            yield CounterMetricFamily("expertmesh_prompt_tokens", _PROMPT_HELP, value=m.prompt_tokens)
            yield CounterMetricFamily("expertmesh_generation_tokens", _GENERATION_HELP, value=m.generation_tokens)
            yield GaugeMetricFamily("expertmesh_requests_in_flight", _IN_FLIGHT_HELP, value=m.in_flight)
        per_node = [  # (name, kind, help, value of a status)
            ("expertmesh_node_ready", GaugeMetricFamily, "Whether the node answers and is ready", None),
            ("expertmesh_queue_depth", GaugeMetricFamily, "Sequences waiting", lambda s: s.waiting),
            ("expertmesh_running_sequences", GaugeMetricFamily, "Sequences running", lambda s: s.running),
            ("expertmesh_queued_tokens", GaugeMetricFamily, "Prompt tokens waiting", lambda s: s.queued_tokens),
            ("expertmesh_engine_steps", CounterMetricFamily, "Engine steps", lambda s: s.steps),
            ("expertmesh_engine_eager_steps", CounterMetricFamily, "Engine steps run eagerly, not as CUDA graphs",
             lambda s: s.eager_steps),
            # vLLM's gpu_cache_usage_perc and num_preemptions_total
            ("expertmesh_kv_cache_usage", GaugeMetricFamily, "Fraction of KV-cache blocks in use",
             lambda s: round(s.kv_blocks_used / max(1, s.kv_blocks_total), 6)),
            ("expertmesh_kv_cache_blocks", GaugeMetricFamily, "KV-cache blocks", lambda s: s.kv_blocks_total),
            ("expertmesh_preemptions", CounterMetricFamily, "Sequences preempted", lambda s: s.preemptions),
            # how the requests spread over the nodes (a lopsided split leaves GPUs idle: RESULTS.md, eighth session)
            ("expertmesh_node_generation_tokens", CounterMetricFamily, "Tokens the node generated",
             lambda s: s.generated_tokens),
        ]
        for name, kind, text, value in per_node:
            family = kind(name, text, labels=["attention_node"])
            for node in nodes:
                if node.status is not None:
                    family.add_metric([str(node.index)], int(node.ready) if value is None else value(node.status))
            yield family
        links = [("expertmesh_link_bytes_sent", "link_bytes"), ("expertmesh_link_messages_sent", "link_messages"),
                 ("expertmesh_link_bytes_received", "link_bytes_received")]
        for name, attr in links:
            family = CounterMetricFamily(name, "Attention-to-expert link traffic",
                                         labels=["attention_node", "expert_node"])
            for node in nodes:
                if node.status is not None:
                    for expert_node, value in enumerate(getattr(node.status, attr)):
                        family.add_metric([str(node.index), str(expert_node)], value)
            yield family
        backends = GaugeMetricFamily("expertmesh_link_backend", "The backend of each attention-to-expert link (1)",
                                     labels=["attention_node", "expert_node", "backend"])
        for node in nodes:
            if node.status is not None:
                for expert_node, backend in enumerate(node.status.link_backends):
                    backends.add_metric([str(node.index), str(expert_node), backend], 1)
        yield backends
        restarts = CounterMetricFamily("expertmesh_node_restarts", "Times a node came back as a new process",
                                       labels=["node"])
        for node in [*nodes, *expert_nodes]:
            restarts.add_metric([node.name.replace(" ", "_")], node.restarts)
        yield restarts
        phases = CounterMetricFamily("expertmesh_node_phase_seconds", "Host time per phase", labels=["node", "phase"])
        walls = GaugeMetricFamily("expertmesh_node_wall_seconds", "Wall time the phases cover", labels=["node"])
        busy = CounterMetricFamily("expertmesh_node_gpu_busy_seconds", "Device time of the node's compute spans "
                                   "(CUDA events; not the waits on links)", labels=["node"])
        spans = CounterMetricFamily("expertmesh_node_gpu_spans", "Compute spans timed on the device (attention: one "
                                    "per segment and microbatch; expert: one per round or batch)", labels=["node"])
        for node in [*nodes, *expert_nodes]:
            if node.status is not None:
                label = node.name.replace(" ", "_")
                for phase, seconds in zip(node.status.phase_names, node.status.phase_seconds):
                    phases.add_metric([label, phase], seconds)
                walls.add_metric([label], node.status.wall_seconds)
                busy.add_metric([label], node.status.gpu_busy_seconds)
                spans.add_metric([label], node.status.gpu_spans)
        yield from (phases, walls, busy, spans)
        if routing is not None:
            decisions = CounterMetricFamily("expertmesh_routing_decisions", "Request routing", labels=["decision"])
            for decision in ("predicted", "next_domain", "overflow", "least_loaded"):
                decisions.add_metric([decision], routing.decisions[decision])
            yield decisions
            routed = CounterMetricFamily("expertmesh_routed_requests", "Requests per domain", labels=["domain"])
            for domain, count in sorted(routing.requests_per_domain.items()):
                routed.add_metric([str(domain)], count)
            yield routed
        tokens = CounterMetricFamily("expertmesh_expert_tokens", "Tokens computed", labels=["node"])
        for node in expert_nodes:
            if node.status is not None:
                tokens.add_metric([node.name.replace(" ", "_")], node.status.tokens_computed)
        yield tokens
