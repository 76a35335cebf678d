"""The placement plan: for each MoE layer and expert, the expert nodes that hold it (several = replicas).

Stored as JSON: {"num_expert_nodes": N, "layers": {"<layer>": [[node, ...] per expert]}}."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..model.spec import ModelSpec

if TYPE_CHECKING:
    from ..config import Config


class PlacementError(ValueError):
    """A placement file does not fit the model or the cluster."""


@dataclass
class Placement:
    num_expert_nodes: int
    nodes_of: dict[int, list[list[int]]]  # nodes_of[layer][expert] = expert nodes holding it, preferred first

    def pairs_on(self, node: int) -> list[tuple[int, int]]:
        """(layer, expert) pairs that expert node `node` holds."""
        return [(layer, expert) for layer, experts in sorted(self.nodes_of.items())
                for expert, nodes in enumerate(experts) if node in nodes]

    def validate(self, spec: ModelSpec) -> "Placement":
        if set(self.nodes_of) != set(spec.moe_layer_ids):
            raise PlacementError(f"placement covers layers {sorted(self.nodes_of)}, model's MoE layers are "
                                 f"{spec.moe_layer_ids}")
        for layer, experts in self.nodes_of.items():
            if len(experts) != spec.num_experts:
                raise PlacementError(f"layer {layer}: placement lists {len(experts)} experts, model has "
                                     f"{spec.num_experts}")
            for expert, nodes in enumerate(experts):
                if not nodes or any(not 0 <= n < self.num_expert_nodes for n in nodes):
                    raise PlacementError(f"layer {layer} expert {expert}: nodes {nodes} not within "
                                         f"0..{self.num_expert_nodes - 1}")
        return self

    @classmethod
    def contiguous(cls, spec: ModelSpec, num_expert_nodes: int) -> "Placement":
        """Expert e of every layer on node e * N // E: contiguous, balanced blocks."""
        if num_expert_nodes > spec.num_experts:
            raise PlacementError(f"{num_expert_nodes} expert nodes for {spec.num_experts} experts per layer: "
                                 "some nodes would hold nothing")
        row = [[e * num_expert_nodes // spec.num_experts] for e in range(spec.num_experts)]
        return cls(num_expert_nodes, {layer: [list(n) for n in row] for layer in spec.moe_layer_ids})

    def to_json(self) -> str:
        return json.dumps({"num_expert_nodes": self.num_expert_nodes,
                           "layers": {str(layer): experts for layer, experts in sorted(self.nodes_of.items())}})

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        try:
            data = json.loads(text)
            return cls(int(data["num_expert_nodes"]),
                       {int(layer): [[int(n) for n in nodes] for nodes in experts]
                        for layer, experts in data["layers"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise PlacementError(f"malformed placement JSON: {exc!r}") from exc

    @classmethod
    def load(cls, path: str | Path, spec: ModelSpec, num_expert_nodes: int) -> "Placement":
        placement = cls.from_json(Path(path).read_text())
        if placement.num_expert_nodes != num_expert_nodes:
            raise PlacementError(f"placement {str(path)!r} is for {placement.num_expert_nodes} expert nodes, "
                                 f"cluster has {num_expert_nodes}")
        return placement.validate(spec)


def load_cluster_topology(config: "Config"):
    """The cluster's Topology if configured (checked against the node counts), else None: one domain."""
    if not config.cluster.topology:
        return None
    from .topology import Topology, TopologyError
    topology = Topology.load(config.cluster.topology)
    if (topology.attention_nodes, topology.expert_nodes) != (config.cluster.attention_nodes, config.cluster.expert_nodes):
        raise TopologyError(f"topology {config.cluster.topology!r} describes {topology.attention_nodes} attention and "
                            f"{topology.expert_nodes} expert nodes, the cluster has {config.cluster.attention_nodes} "
                            f"and {config.cluster.expert_nodes}")
    return topology


def load_cluster_placement(config: "Config", spec: ModelSpec) -> Placement:
    """The cluster's placement: its file if configured, else contiguous blocks."""
    if config.cluster.placement:
        return Placement.load(config.cluster.placement, spec, config.cluster.expert_nodes)
    return Placement.contiguous(spec, config.cluster.expert_nodes)
