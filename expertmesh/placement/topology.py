"""The cluster's shape as placement sees it: domains (hosts, NVLink islands), which node sits in which,
what a byte costs inside and across domains, how many experts of a layer a node can hold, and the load bounds."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class TopologyError(ValueError):
    """A cluster description is inconsistent or out of range."""


def contiguous_domains(num_nodes: int, num_domains: int) -> list[int]:
    """Node i in domain i * D // n: equal contiguous blocks (hosts are usually numbered this way)."""
    return [i * num_domains // num_nodes for i in range(num_nodes)]


@dataclass
class Topology:
    num_domains: int
    attention_domain: list[int]  # attention_domain[i] = domain of attention node i
    expert_domain: list[int]  # expert_domain[j] = domain of expert node j
    slots_per_node: int | None = None  # experts of one layer a node can hold; None = just its share (no replicas)
    intra_cost_per_byte: float = 1.0  # relative cost the optimisers minimise
    inter_cost_per_byte: float = 10.0
    intra_bandwidth_gbps: float = 3200.0  # per node and direction (NVLink-class), for the modelled step time
    inter_bandwidth_gbps: float = 400.0  # per node and direction (one NIC)
    load_bound: float = 1.1  # expert-node tokens per layer, max/mean
    attention_load_bound: float = 1.25  # attention-node tokens, max/mean

    @property
    def attention_nodes(self) -> int:
        return len(self.attention_domain)

    @property
    def expert_nodes(self) -> int:
        return len(self.expert_domain)

    def expert_nodes_in(self, domain: int) -> list[int]:
        return [j for j, d in enumerate(self.expert_domain) if d == domain]

    def attention_nodes_in(self, domain: int) -> list[int]:
        return [i for i, d in enumerate(self.attention_domain) if d == domain]

    def base_slots(self, num_experts: int) -> int:
        """Experts per node per layer without replicas (the busiest node's share)."""
        return math.ceil(num_experts / self.expert_nodes)

    def slots(self, num_experts: int) -> int:
        slots = self.slots_per_node if self.slots_per_node is not None else self.base_slots(num_experts)
        if slots * self.expert_nodes < num_experts:
            raise TopologyError(f"slots_per_node={slots} x {self.expert_nodes} expert nodes cannot hold "
                                f"{num_experts} experts per layer")
        return slots

    def cost_per_byte(self, domain_a: int, domain_b: int) -> float:
        return self.intra_cost_per_byte if domain_a == domain_b else self.inter_cost_per_byte

    def validate(self) -> "Topology":
        if self.num_domains < 1:
            raise TopologyError(f"domains={self.num_domains}; need at least one")
        if not self.attention_domain or not self.expert_domain:
            raise TopologyError(f"need attention and expert nodes, got {len(self.attention_domain)} and "
                                f"{len(self.expert_domain)}")
        for role, domains in (("attention", self.attention_domain), ("expert", self.expert_domain)):
            bad = [d for d in domains if not 0 <= d < self.num_domains]
            if bad:
                raise TopologyError(f"{role} node domains {bad} not within 0..{self.num_domains - 1}")
        empty = [d for d in range(self.num_domains) if d not in self.expert_domain]
        if empty:
            raise TopologyError(f"domains {empty} have no expert node; every domain needs one")
        if self.slots_per_node is not None and self.slots_per_node < 1:
            raise TopologyError(f"slots_per_node={self.slots_per_node}; must be >= 1")
        if self.load_bound < 1.0 or self.attention_load_bound < 1.0:
            raise TopologyError(f"load bounds {self.load_bound}, {self.attention_load_bound} are max/mean: >= 1")
        return self

    @classmethod
    def uniform(cls, domains: int, attention_nodes: int, expert_nodes: int, slots_per_node: int | None = None,
                **costs: Any) -> "Topology":
        """Nodes spread in contiguous blocks over the domains, e.g. uniform(8, 64, 64) for 8 hosts of 8+8 GPUs."""
        return cls(domains, contiguous_domains(attention_nodes, domains), contiguous_domains(expert_nodes, domains),
                   slots_per_node, **costs).validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Topology":
        """{"domains", "attention_nodes", "expert_nodes", "slots_per_node"?, "attention_domain"?, "expert_domain"?,
        costs, bandwidths and bounds?}: node lists given explicitly win over the counts."""
        data = dict(data)
        known = {"domains", "attention_nodes", "expert_nodes", "attention_domain", "expert_domain", "slots_per_node",
                 "intra_cost_per_byte", "inter_cost_per_byte", "intra_bandwidth_gbps", "inter_bandwidth_gbps",
                 "load_bound", "attention_load_bound"}
        unknown = set(data) - known
        if unknown:
            raise TopologyError(f"unknown cluster keys {sorted(unknown)}; known: {sorted(known)}")
        try:
            domains = int(data.pop("domains"))
            attention = data.pop("attention_domain", None) or contiguous_domains(int(data.pop("attention_nodes")),
                                                                                    domains)
            expert = data.pop("expert_domain", None) or contiguous_domains(int(data.pop("expert_nodes")), domains)
        except KeyError as exc:
            raise TopologyError(f"cluster description lacks {exc.args[0]!r}") from exc
        for key in ("attention_nodes", "expert_nodes"):
            if key in data and int(data.pop(key)) != len(attention if key.startswith("a") else expert):
                raise TopologyError(f"{key} disagrees with the explicit domain list given for it")
        return cls(domains, [int(d) for d in attention], [int(d) for d in expert], **data).validate()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["domains"] = data.pop("num_domains")
        return data

    @classmethod
    def load(cls, path: str | Path) -> "Topology":
        from ..config import read_structured
        return cls.from_dict(read_structured(path))
