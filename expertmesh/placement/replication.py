"""Replicas of hot experts in free expert-node slots: locality-aware (a replica where the tokens using the expert come
from, GRACE-MoE style), a load-only baseline in the manner of DeepSeek's EPLB, and the run-time replica choice rule."""
from __future__ import annotations

import numpy as np

from .plan import Placement
from .topology import Topology


def choose_replica(nodes_holding: list[int], attention_domain: int, node_domain: list[int],
                   node_load: list[float], spill_above: float | None = None) -> int:
    """The expert node an attention node in `attention_domain` sends to: a replica in its own domain if there is
    one (cheap bytes), the least loaded among those; else the least loaded of all. Ties go to the earlier listed.
    With spill_above (e.g. load_bound x the mean node load): when every local replica is above it, the least loaded
    of all instead, so a domain sent more than its share cannot overload its nodes while remote copies idle."""
    if not nodes_holding:
        raise ValueError("nodes_holding is empty: the expert has no node")
    local = [n for n in nodes_holding if node_domain[n] == attention_domain]
    if local and spill_above is not None and min(node_load[n] for n in local) > spill_above:
        local = []
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


def _pack(copies: list[tuple[float, int]], nodes: list[int], slots: np.ndarray, load: np.ndarray,
          pairs: np.ndarray | None = None) -> list[tuple[int, int]] | None:
    """Longest-processing-time packing of one domain's copies (load, expert): heaviest first onto the node with a free
    slot, not holding that expert yet, that is least loaded net of the tokens it would share with the node's experts
    (pairs[e, f]: tokens choosing both, as a share of e's; such tokens cost the node one dispatch, not two).
    Adds the dispatched tokens to `load`; None if a copy finds no room."""
    room = {n: int(slots[n]) for n in nodes}
    holds: dict[int, set[int]] = {n: set() for n in nodes}
    placed = []
    for share, expert in sorted(copies, key=lambda c: (-c[0], c[1])):
        open_nodes = [n for n in nodes if room[n] > 0 and expert not in holds[n]]
        if not open_nodes:
            return None

        def shared(n: int) -> float:
            return min(sum(pairs[expert, f] for f in holds[n]), 1.0) * share if pairs is not None else 0.0
        node = min(open_nodes, key=lambda n: (load[n] - shared(n), n))
        room[node] -= 1
        holds[node].add(expert)
        load[node] += share - shared(node)  # tokens dispatched, as the replay counts them
        placed.append((expert, node))
    return placed


class _LayerPlan:
    """Which experts each domain holds at one layer (copies, several per domain allowed) and what that costs:
    in-domain demand split evenly over the domain's copies, demand of domains without a copy over all copies."""

    def __init__(self, topology: Topology, demand: np.ndarray, slots: int, pairs: np.ndarray | None = None):
        self.topology, self.demand, self.slots = topology, demand, np.full(topology.expert_nodes, slots)
        self.pairs = pairs
        self.members = [topology.expert_nodes_in(d) for d in range(topology.num_domains)]

    def evaluate(self, count: np.ndarray) -> tuple[float, float, float, list[tuple[int, int]] | None]:
        """count[d, e] copies -> (excess over the load bound, crossing selections, peak node load, packing)."""
        missing = count == 0
        uncovered = (self.demand * missing).sum(axis=0)  # [E]
        share = np.where(missing, 0.0, self.demand / np.maximum(count, 1))
        share += uncovered / np.maximum(count.sum(axis=0), 1)
        load = np.zeros(self.topology.expert_nodes)
        packing: list[tuple[int, int]] = []
        for domain, nodes in enumerate(self.members):
            copies = [(share[domain, e], e) for e in range(count.shape[1]) for _ in range(int(count[domain, e]))]
            placed = _pack(copies, nodes, self.slots, load, self.pairs)
            if placed is None:
                return float("inf"), float("inf"), float("inf"), None
            packing += placed
        excess = float(np.maximum(load - self.topology.load_bound * load.mean(), 0).sum())
        return excess, float(uncovered.sum()), float(load.max()), packing


def replicate(placement: Placement, topology: Topology, demand: np.ndarray, excess_weight: float = 0.25,
              token_pairs: np.ndarray | None = None) -> Placement:
    """Fill every free slot, one copy at a time, choosing the (expert, domain) that most lowers
    excess_weight x (node load over topology.load_bound) + (selections crossing domains), then the peak; each
    domain's copies are then packed onto its nodes heaviest first (a copy's node inside its domain changes no
    crossing, only balance). demand[d, l, e]: expected selections of expert e at layer index l by tokens of attention
    domain d (e.g. from rebatched fitting requests). excess_weight < 1 favours locality: on held-out text the plan's
    balance does not survive the shift in domain mix anyway, and the run-time spill (choose_replica spill_above)
    restores it; measured in benchmarks/semantic_eval.py, 0.25 beat lexicographic balance-first on both counts.
    token_pairs[l, e, f] (Coactivation.token_pairs): packing puts experts chosen by the same tokens on one node."""
    experts = len(next(iter(placement.nodes_of.values())))
    slots = topology.slots(experts)
    capacity = np.array([len(topology.expert_nodes_in(d)) for d in range(topology.num_domains)])
    nodes_of = {}
    for index, layer in enumerate(sorted(placement.nodes_of)):
        pairs = None
        if token_pairs is not None:
            # share of e's selections that also chose f (diagonal zeroed: a node never holds e twice)
            pairs = token_pairs[index] / np.maximum(np.diag(token_pairs[index]), 1)[:, None]
            np.fill_diagonal(pairs, 0.0)
        plan = _LayerPlan(topology, demand[:, index, :], slots, pairs)
        count = np.zeros((topology.num_domains, experts), np.int64)
        for expert, nodes in enumerate(placement.nodes_of[layer]):
            for node in nodes:
                count[topology.expert_domain[node], expert] += 1
        current = plan.evaluate(count)
        while True:
            best = None
            for domain in range(topology.num_domains):
                if count[domain].sum() >= capacity[domain] * slots:
                    continue
                for expert in np.flatnonzero(count[domain] < capacity[domain]):
                    count[domain, expert] += 1
                    trial = plan.evaluate(count)
                    count[domain, expert] -= 1
                    key = (round(excess_weight * (current[0] - trial[0]) + current[1] - trial[1], 6),
                           round(current[2] - trial[2], 6))
                    if trial[3] is not None and (best is None or key > best[0]):
                        best = (key, domain, expert, trial)
            if best is None:
                break
            _, domain, expert, current = best
            count[domain, expert] += 1
        holders: list[list[int]] = [[] for _ in range(experts)]
        for expert, node in current[3] or []:
            holders[expert].append(node)
        # the original node first where it still holds the expert, so "preferred first" changes least
        nodes_of[layer] = [sorted(h, key=lambda n, e=e: (n not in placement.nodes_of[layer][e][:1], n))
                           for e, h in enumerate(holders)]
    return Placement(placement.num_expert_nodes, nodes_of)


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
