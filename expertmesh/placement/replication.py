"""Replicas of hot experts in free expert-node slots: locality-aware (a replica where the tokens using the expert come
from, GRACE-MoE style), a load-only baseline in the manner of DeepSeek's EPLB, and the run-time replica choice rule."""
from __future__ import annotations

import numpy as np

from .plan import Placement
from .topology import Topology


def choose_replica(nodes_holding: list[int], attention_domain: int, node_domain: list[int],
                   node_load: list[float]) -> int:
    """The expert node an attention node in `attention_domain` sends to: a replica in its own domain if there is
    one (cheap bytes), the least loaded among those; else the least loaded of all. Ties go to the earlier listed."""
    if not nodes_holding:
        raise ValueError("nodes_holding is empty: the expert has no node")
    local = [n for n in nodes_holding if node_domain[n] == attention_domain]
    return min(local or nodes_holding, key=lambda n: node_load[n])


def _water_fill(load: np.ndarray, nodes: list[int], amount: float) -> None:
    """Pour `amount` onto the least loaded of `nodes` until levels meet (what least-loaded choice does over time)."""
    if amount <= 0:
        return
    levels = np.sort(load[nodes])
    for count in range(1, len(levels) + 1):
        level = (levels[:count].sum() + amount) / count
        if count == len(levels) or level <= levels[count]:
            break
    for n in nodes:
        load[n] = max(load[n], level)


def expected_loads(holders: list[list[int]], demand: np.ndarray, node_domain: np.ndarray,
                   num_nodes: int) -> tuple[np.ndarray, float]:
    """One layer under choose_replica: ([N] selections per node, selections crossing domains).
    demand[d, e] = selections of expert e by tokens whose attention node is in domain d."""
    load = np.zeros(num_nodes)
    uncovered = []
    for expert, nodes in enumerate(holders):
        for domain in range(demand.shape[0]):
            local = [n for n in nodes if node_domain[n] == domain]
            if local:
                load[local] += demand[domain, expert] / len(local)
            elif demand[domain, expert] > 0:
                uncovered.append((expert, demand[domain, expert]))
    for expert, amount in sorted(uncovered, key=lambda item: -item[1]):
        _water_fill(load, holders[expert], amount)
    return load, float(sum(amount for _, amount in uncovered))


def _free_slots(placement: Placement, layer: int, slots: int) -> np.ndarray:
    used = np.zeros(placement.num_expert_nodes, np.int64)
    for nodes in placement.nodes_of[layer]:
        for n in nodes:
            used[n] += 1
    return slots - used


def _copy(placement: Placement) -> Placement:
    return Placement(placement.num_expert_nodes,
                     {layer: [list(nodes) for nodes in experts] for layer, experts in placement.nodes_of.items()})


def replicate(placement: Placement, topology: Topology, demand: np.ndarray) -> Placement:
    """Fill free slots, one replica at a time, with the addition that most lowers (1) the load excess over
    topology.load_bound, then (2) the selections crossing domains. demand[d, l, e]: expected selections of expert e
    at layer index l by tokens of attention domain d (e.g. from rebatched fitting requests)."""
    result = _copy(placement)
    node_domain = np.array(topology.expert_domain)
    num_nodes = topology.expert_nodes
    slots = topology.slots(len(next(iter(placement.nodes_of.values()))))
    for index, layer in enumerate(sorted(result.nodes_of)):
        holders = result.nodes_of[layer]
        layer_demand = demand[:, index, :]
        free = _free_slots(result, layer, slots)
        while free.sum() > 0:
            load, crossing = expected_loads(holders, layer_demand, node_domain, num_nodes)
            limit = topology.load_bound * load.mean()
            excess = np.maximum(load - limit, 0).sum()
            best = None
            for domain in range(topology.num_domains):
                open_nodes = [n for n in topology.expert_nodes_in(domain) if free[n] > 0]
                if not open_nodes:
                    continue
                for expert, nodes in enumerate(holders):
                    candidates = [n for n in open_nodes if n not in nodes]
                    if not candidates:
                        continue
                    node = min(candidates, key=lambda n: load[n])
                    trial = [list(h) for h in holders]
                    trial[expert].append(node)
                    new_load, new_crossing = expected_loads(trial, layer_demand, node_domain, num_nodes)
                    new_excess = np.maximum(new_load - topology.load_bound * new_load.mean(), 0).sum()
                    key = (round(excess - new_excess, 6), round(crossing - new_crossing, 6),
                           round(load.max() - new_load.max(), 6))
                    if best is None or key > best[0]:
                        best = (key, expert, node)
            if best is None:
                break  # every node with room already holds every expert
            # Slots are provisioned memory: fill them all. A copy that alone tips a node over the bound is taken
            # only when no copy helps; the next copies usually even it out (copies come in symmetric sets).
            _, expert, node = best
            holders[expert].append(node)
            free[node] -= 1
    return result


def replicate_by_load(placement: Placement, topology: Topology, load: np.ndarray) -> Placement:
    """Load-only baseline (EPLB-like): give each free slot to the expert with the most load per copy, then pack the
    new copies, heaviest first, onto the least loaded node with room that does not hold that expert; locality ignored.
    load[l, e] = selections of expert e at layer index l."""
    result = _copy(placement)
    slots = topology.slots(len(next(iter(placement.nodes_of.values()))))
    for index, layer in enumerate(sorted(result.nodes_of)):
        holders = result.nodes_of[layer]
        free = _free_slots(result, layer, slots)
        copies = np.array([len(nodes) for nodes in holders])
        extra = np.zeros(len(holders), np.int64)
        for _ in range(int(free.sum())):
            per_copy = load[index] / (copies + extra)
            per_copy[copies + extra >= topology.expert_nodes] = -1  # every node already holds it
            if per_copy.max() < 0:
                break
            extra[int(np.argmax(per_copy))] += 1
        node_load = np.zeros(topology.expert_nodes)
        for expert, nodes in enumerate(holders):
            node_load[nodes] += load[index, expert] / (copies[expert] + extra[expert])
        # primaries keep their share; new copies are packed heaviest first
        pending = sorted(((load[index, e] / (copies[e] + extra[e]), e) for e in range(len(holders))
                          for _ in range(extra[e])), reverse=True)
        for share, expert in pending:
            room = [n for n in range(topology.expert_nodes) if free[n] > 0 and n not in holders[expert]]
            if not room:
                continue
            node = min(room, key=lambda n: node_load[n])
            holders[expert].append(node)
            free[node] -= 1
            node_load[node] += share
    return result
