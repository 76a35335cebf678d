"""Gateway counters and the Prometheus text exposition of them and of every attention node's status."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .nodes import AttentionNodeClient, NodeLink


@dataclass
class GatewayMetrics:
    requests: Counter = field(default_factory=Counter)  # by outcome: completed, failed, rejected, aborted
    prompt_tokens: int = 0
    generation_tokens: int = 0
    in_flight: int = 0
    in_flight_tokens: int = 0  # prompt tokens of the requests in flight

    def render(self, nodes: list[AttentionNodeClient], expert_nodes: list[NodeLink], routing=None) -> str:
        lines = ["# TYPE expertmesh_requests_total counter"]
        for outcome in ("completed", "failed", "rejected", "aborted"):
            lines.append(f'expertmesh_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')
        lines += ["# TYPE expertmesh_prompt_tokens_total counter", f"expertmesh_prompt_tokens_total {self.prompt_tokens}",
                  "# TYPE expertmesh_generation_tokens_total counter",
                  f"expertmesh_generation_tokens_total {self.generation_tokens}",
                  "# TYPE expertmesh_requests_in_flight gauge", f"expertmesh_requests_in_flight {self.in_flight}"]
        per_node = {
            "expertmesh_node_ready": ("gauge", lambda s, n: int(n.ready)),
            "expertmesh_queue_depth": ("gauge", lambda s, n: s.waiting),
            "expertmesh_running_sequences": ("gauge", lambda s, n: s.running),
            "expertmesh_queued_tokens": ("gauge", lambda s, n: s.queued_tokens),
            "expertmesh_engine_steps_total": ("counter", lambda s, n: s.steps),
            # vLLM's gpu_cache_usage_perc and num_preemptions_total
            "expertmesh_kv_cache_usage": ("gauge", lambda s, n: round(s.kv_blocks_used / max(1, s.kv_blocks_total), 6)),
            "expertmesh_kv_cache_blocks": ("gauge", lambda s, n: s.kv_blocks_total),
            "expertmesh_preemptions_total": ("counter", lambda s, n: s.preemptions),
        }
        for name, (kind, value) in per_node.items():
            lines.append(f"# TYPE {name} {kind}")
            for node in nodes:
                if node.status is not None:
                    lines.append(f'{name}{{attention_node="{node.index}"}} {value(node.status, node)}')
        links = {"expertmesh_link_bytes_sent_total": "link_bytes", "expertmesh_link_messages_sent_total": "link_messages",
                 "expertmesh_link_bytes_received_total": "link_bytes_received"}
        for name, attr in links.items():
            lines.append(f"# TYPE {name} counter")
            for node in nodes:
                if node.status is not None:
                    for expert_node, value in enumerate(getattr(node.status, attr)):
                        lines.append(f'{name}{{attention_node="{node.index}",expert_node="{expert_node}"}} {value}')
        lines += ["# TYPE expertmesh_node_phase_seconds_total counter", "# TYPE expertmesh_node_wall_seconds counter"]
        for node in [*nodes, *expert_nodes]:
            status, label = node.status, node.name.replace(" ", "_")
            if status is None:
                continue
            for phase, seconds in zip(status.phase_names, status.phase_seconds):
                lines.append(f'expertmesh_node_phase_seconds_total{{node="{label}",phase="{phase}"}} {seconds:.6f}')
            lines.append(f'expertmesh_node_wall_seconds{{node="{label}"}} {status.wall_seconds:.6f}')
        if routing is not None:
            lines.append("# TYPE expertmesh_routing_decisions_total counter")
            for decision in ("predicted", "next_domain", "overflow", "least_loaded"):
                lines.append(f'expertmesh_routing_decisions_total{{decision="{decision}"}} {routing.decisions[decision]}')
            lines.append("# TYPE expertmesh_routed_requests_total counter")
            for domain, count in sorted(routing.requests_per_domain.items()):
                lines.append(f'expertmesh_routed_requests_total{{domain="{domain}"}} {count}')
        lines.append("# TYPE expertmesh_expert_tokens_total counter")
        for node in expert_nodes:
            if node.status is not None:
                lines.append(f'expertmesh_expert_tokens_total{{node="{node.name.replace(" ", "_")}"}} '
                             f'{node.status.tokens_computed}')
        return "\n".join(lines) + "\n"
