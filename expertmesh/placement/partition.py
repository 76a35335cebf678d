"""Co-activation placement: each layer's experts over domains, then over each domain's expert nodes, so that a
request's experts sit in few domains and a token's on few nodes, consistently across layers, within the load bound."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .coactivation import Coactivation, coactivation, request_usage, split_requests
from .plan import Placement
from .topology import Topology
from .trace import RoutingTrace


@dataclass
class EdgeWeights:
    """How much each kind of co-activation counts; each matrix is first scaled to sum to 1."""
    token: float = 1.0  # same token, same layer: co-locating them on a node saves a dispatch
    next_layer: float = 1.0  # same token, consecutive layers: keeps a domain's experts one chain
    request: float = 4.0  # same request, any layers: what rebatching a request into one domain exploits


def affinity_graph(stats: Coactivation, weights: EdgeWeights) -> np.ndarray:
    """[L*E, L*E] symmetric edge weights, zero diagonal; vertex = layer * E + expert."""
    num_layers, experts = stats.num_layers, stats.num_experts
    size = num_layers * experts
    graph = np.zeros((size, size))

    def scaled(matrix: np.ndarray) -> np.ndarray:
        total = matrix.sum()
        return matrix / total if total > 0 else matrix

    token = stats.token_pairs.astype(np.float64).copy()
    for layer in range(num_layers):
        np.fill_diagonal(token[layer], 0.0)
    token = scaled(token)
    following = scaled(stats.next_layer.astype(np.float64))
    for layer in range(num_layers):
        block = slice(layer * experts, (layer + 1) * experts)
        graph[block, block] += weights.token * token[layer]
        if layer + 1 < num_layers:
            after = slice((layer + 1) * experts, (layer + 2) * experts)
            graph[block, after] += weights.next_layer * following[layer]
            graph[after, block] += weights.next_layer * following[layer].T
    request = stats.request_pairs.astype(np.float64).copy()
    np.fill_diagonal(request, 0.0)
    graph += weights.request * scaled(request)
    graph = (graph + graph.T) / 2
    np.fill_diagonal(graph, 0.0)
    return graph


def _excess(part_load: np.ndarray, limit: np.ndarray) -> float:
    return float(np.maximum(part_load - limit, 0.0).sum())


class _Problem:
    """One balanced partition of a graph with a vertex per (layer, expert): a part (domain or node) takes `caps[p]`
    experts of every layer. Greedy agglomeration builds a start, Kernighan-Lin swaps within a layer refine it, seeded
    restarts keep the best. Loads are selections per layer; swaps never raise the total excess over the bound."""

    def __init__(self, graph: np.ndarray, layer_of: np.ndarray, load: np.ndarray, caps: np.ndarray, bound: float,
                 bias: np.ndarray | None = None):
        self.graph, self.layer_of, self.load, self.caps = graph, layer_of, load, caps
        # bias[v, p]: weight of vertex v sitting in part p on its own (e.g. demand of the part's requests for it)
        self.bias = bias if bias is not None else np.zeros((len(layer_of), len(caps)))
        self.layers = [np.flatnonzero(layer_of == layer) for layer in np.unique(layer_of)]
        share = caps / caps.sum()
        # limit[layer, part]: the load a part may carry at a layer
        self.limit = np.stack([bound * share * load[v].sum() for v in self.layers])

    def part_loads(self, part_of: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(part_of[v], weights=self.load[v], minlength=len(self.caps))
                         for v in self.layers])

    def score(self, part_of: np.ndarray) -> tuple[float, float]:
        """(total excess over the load limits, internal edge weight)."""
        same = part_of[:, None] == part_of[None, :]
        inside = (self.graph * same).sum() / 2 + self.bias[np.arange(len(part_of)), part_of].sum()
        return _excess(self.part_loads(part_of), self.limit), float(inside)

    def greedy(self) -> np.ndarray:
        """Agglomerate: layer by layer, heaviest expert first, into the open part it is most tied to."""
        part_of = np.full(len(self.layer_of), -1)
        parts = len(self.caps)
        for index, vertices in enumerate(self.layers):
            taken = np.zeros(parts, np.int64)
            part_load = np.zeros(parts)
            for v in vertices[np.argsort(-self.load[vertices], kind="stable")]:
                assigned = part_of >= 0
                tie = np.array([self.graph[v, assigned & (part_of == p)].sum() for p in range(parts)]) + self.bias[v]
                headroom = self.limit[index] - part_load - self.load[v]
                # Prefer parts where it fits; among them the most tied; else the least loaded.
                key = [(taken[p] < self.caps[p], headroom[p] >= 0, tie[p], headroom[p]) for p in range(parts)]
                best = max((p for p in range(parts) if taken[p] < self.caps[p]), key=lambda p: key[p])
                part_of[v] = best
                taken[best] += 1
                part_load[best] += self.load[v]
        return part_of

    def random(self, rng: np.random.Generator) -> np.ndarray:
        part_of = np.empty(len(self.layer_of), np.int64)
        slots = np.repeat(np.arange(len(self.caps)), self.caps)
        for vertices in self.layers:
            part_of[vertices] = rng.permutation(slots)
        return part_of

    def refine(self, part_of: np.ndarray, max_swaps: int = 10_000) -> np.ndarray:
        """Steepest-gain swaps of two same-layer vertices in different parts: first to cut load excess,
        then to raise internal weight without adding excess. Stops at a local optimum."""
        part_of = part_of.copy()
        parts = len(self.caps)
        side = self.graph @ np.eye(parts)[part_of] + self.bias  # side[v, p] = weight of v being in part p
        loads = self.part_loads(part_of)
        for _ in range(max_swaps):
            best = None
            for index, v in enumerate(self.layers):
                own = part_of[v]
                across = side[v][:, own]  # across[a, b] = weight from a into b's part
                own_side = side[v, own]
                gain = across - own_side[:, None] + across.T - own_side[None, :] - 2 * self.graph[np.ix_(v, v)]
                # load of a's part after the swap, and of b's part
                delta = self.load[v][None, :] - self.load[v][:, None]
                load_a = loads[index][own][:, None] + delta
                load_b = loads[index][own][None, :] - delta
                limit_a, limit_b = self.limit[index][own][:, None], self.limit[index][own][None, :]
                before = (np.maximum(loads[index][own] - self.limit[index][own], 0)[:, None]
                          + np.maximum(loads[index][own] - self.limit[index][own], 0)[None, :])
                after = np.maximum(load_a - limit_a, 0) + np.maximum(load_b - limit_b, 0)
                relief = before - after
                valid = (own[:, None] != own[None, :]) & (relief >= -1e-9)
                # Lexicographic: relief of excess first, then edge gain.
                key = np.where(valid, np.round(relief, 9) * 1e6 + gain, -np.inf)
                ok = valid & ((relief > 1e-9) | (gain > 1e-12))
                if not ok.any():
                    continue
                key = np.where(ok, key, -np.inf)
                a, b = np.unravel_index(int(np.argmax(key)), key.shape)
                if best is None or key[a, b] > best[0]:
                    best = (key[a, b], index, v[a], v[b])
            if best is None:
                return part_of
            _, index, a, b = best
            pa, pb = part_of[a], part_of[b]
            part_of[a], part_of[b] = pb, pa
            side[:, pa] += self.graph[:, b] - self.graph[:, a]
            side[:, pb] += self.graph[:, a] - self.graph[:, b]
            loads[index][pa] += self.load[b] - self.load[a]
            loads[index][pb] += self.load[a] - self.load[b]
        return part_of

    def solve(self, seed: int, restarts: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        starts = [self.greedy()] + [self.random(rng) for _ in range(restarts)]
        results = [self.refine(start) for start in starts]
        # least excess, then most internal weight; the first wins ties so the greedy start is preferred
        scored = [(round(-self.score(r)[0], 9), self.score(r)[1]) for r in results]
        return results[max(range(len(results)), key=lambda i: (scored[i], -i))]


def base_counts(num_experts: int, expert_nodes: int) -> np.ndarray:
    """Experts each node holds per layer before replication: as equal as possible, the extras spread evenly over the
    nodes (so over the domains too; with more nodes than experts some hold only replicas)."""
    bounds = np.arange(expert_nodes + 1) * num_experts // expert_nodes
    return np.diff(bounds)


def _nodes_within_domains(stats: Coactivation, topology: Topology, domain_of: np.ndarray, seed: int,
                          restarts: int) -> Placement:
    """Each domain's experts over its nodes: there only same-token edges save bytes (fewer nodes per token);
    the chain to the next layer is kept as a tie-break."""
    num_layers, experts = stats.num_layers, stats.num_experts
    layer_of = np.repeat(np.arange(num_layers), experts)
    load = stats.load.reshape(-1).astype(np.float64)
    node_caps = base_counts(experts, topology.expert_nodes)
    node_graph = affinity_graph(stats, EdgeWeights(token=1.0, next_layer=0.1, request=0.0))
    node_of = np.zeros(len(load), np.int64)
    for domain in range(topology.num_domains):
        nodes = np.array(topology.expert_nodes_in(domain))
        members = np.flatnonzero(domain_of == domain)
        if len(members) == 0:
            continue
        if len(nodes) == 1:
            node_of[members] = nodes[0]
            continue
        sub = _Problem(node_graph[np.ix_(members, members)], layer_of[members], load[members], node_caps[nodes],
                       topology.load_bound)
        node_of[members] = nodes[sub.solve(seed + 1 + domain, restarts)]
    return Placement(topology.expert_nodes, {int(layer): [[int(node_of[index * experts + e])] for e in range(experts)]
                                             for index, layer in enumerate(stats.moe_layers)})


def _domain_problem(stats: Coactivation, topology: Topology, weights: EdgeWeights,
                    bias: np.ndarray | None = None) -> _Problem:
    layer_of = np.repeat(np.arange(stats.num_layers), stats.num_experts)
    node_caps = base_counts(stats.num_experts, topology.expert_nodes)
    domain_caps = np.array([node_caps[topology.expert_nodes_in(d)].sum() for d in range(topology.num_domains)])
    return _Problem(affinity_graph(stats, weights), layer_of, stats.load.reshape(-1).astype(np.float64),
                    domain_caps, topology.load_bound, bias)


def partition(stats: Coactivation, topology: Topology, weights: EdgeWeights | None = None, seed: int = 0,
              restarts: int = 8) -> Placement:
    """Experts over domains (all layers at once), then each domain's experts over its nodes; one node per expert."""
    problem = _domain_problem(stats, topology, weights or EdgeWeights())
    domain_of = problem.solve(seed, restarts) if topology.num_domains > 1 else np.zeros(len(problem.load), np.int64)
    return _nodes_within_domains(stats, topology, domain_of, seed, restarts)


def assign_requests(local: np.ndarray, sizes: np.ndarray, topology: Topology, domain_slack: float = 0.0) -> np.ndarray:
    """[R] attention domain of each fitting request: the most decided first, each to the domain holding most of its
    routing (local[r, d]) while that domain's tokens stay within (1 + domain_slack) x its expert nodes' share
    (as the rebatch policy does at run time)."""
    attention_share = np.bincount(topology.expert_domain, minlength=topology.num_domains) / topology.expert_nodes
    capacity = (1 + domain_slack) * sizes.sum() * attention_share
    ordered = np.sort(local, axis=1)
    margin = (ordered[:, -1] - ordered[:, -2]) / np.maximum(sizes, 1) if local.shape[1] > 1 else np.zeros(len(sizes))
    volume = np.zeros(topology.num_domains)
    domain_of = np.empty(len(sizes), np.int64)
    for r in np.argsort(-margin, kind="stable"):
        for d in np.argsort(-local[r], kind="stable"):
            if volume[d] + sizes[r] <= capacity[d]:
                break
        else:
            d = int(np.argmin(volume / np.maximum(attention_share, 1e-12)))
        domain_of[r] = d
        volume[d] += sizes[r]
    return domain_of


def place(trace: RoutingTrace, topology: Topology, replicate_hot: bool = True, tokens_per_request: int = 256,
          iterations: int = 4, demand_weight: float = 8.0, weights: EdgeWeights | None = None,
          seed: int = 0, prompt_tokens: int = 64) -> Placement:
    """The offline placement: graph partition, then alternate (a) sending each fitting request (a span of
    tokens_per_request) where the predictor fitted for the current placement sends its first prompt_tokens, within
    the domains' shares, and (b) re-partitioning with each domain's resulting demand for an expert as a bias;
    replicas are added after each round; the round with the fewest selections crossing domains wins."""
    from .predictor import DomainPredictor, holder_domains
    from .replication import replicate
    weights = weights or EdgeWeights()
    spans = split_requests(trace, tokens_per_request)
    sizes = (spans[:, 1] - spans[:, 0]).astype(np.float64)
    usage = request_usage(trace, spans).astype(np.float64)  # [R, L, E]
    stats = coactivation(trace, spans)

    def demand_of(placement: Placement) -> tuple[float, np.ndarray]:
        """Requests sent where the predictor fitted for this placement sends them (its errors included)."""
        held = holder_domains(placement, topology).astype(np.float64)  # [L, E, D]
        predictor = DomainPredictor.fit(trace, placement, topology)
        scores = np.stack([predictor.scores(trace.token_ids[start:start + prompt_tokens]) for start in spans[:, 0]])
        domain_of = assign_requests(scores, sizes, topology)
        demand = np.stack([usage[domain_of == d].sum(axis=0) for d in range(topology.num_domains)])
        return float((demand * (1 - held.transpose(2, 0, 1))).sum()), demand

    def finish(primary: Placement) -> Placement:
        return replicate(primary, topology, demand_of(primary)[1], token_pairs=stats.token_pairs) \
            if replicate_hot else primary

    primary = partition(stats, topology, weights, seed)
    domain_of = np.array([topology.expert_domain[nodes[0]] for layer in sorted(primary.nodes_of)
                          for nodes in primary.nodes_of[layer]])
    current = finish(primary)
    best = (demand_of(current)[0], current)
    if topology.num_domains == 1:
        return current
    for _ in range(iterations):
        demand = demand_of(current)[1]
        bias = demand_weight * demand.transpose(1, 2, 0).reshape(-1, topology.num_domains) / demand.sum()
        domain_of = _domain_problem(stats, topology, weights, bias).refine(domain_of)
        current = finish(_nodes_within_domains(stats, topology, domain_of, seed, 8))
        crossing = demand_of(current)[0]
        if crossing < best[0] - 1e-9:
            best = (crossing, current)
    return best[1]


def place_files(trace_path: str, cluster_path: str, out: str, replicate_hot: bool = False,
                predictor_out: str | None = None, tokens_per_request: int = 256, seed: int = 0) -> str:
    """`expertmesh place`: fit on a trace file, write the placement JSON (and the predictor); returns a summary."""
    from .predictor import DomainPredictor
    trace = RoutingTrace.load(trace_path)
    topology = Topology.load(cluster_path)
    placement = place(trace, topology, replicate_hot, tokens_per_request, seed=seed)
    with open(out, "w") as handle:
        handle.write(placement.to_json())
    copies = sum(len(nodes) for nodes in next(iter(placement.nodes_of.values())))
    summary = (f"placement: {out} ({topology.expert_nodes} expert nodes in {topology.num_domains} domains, "
               f"{copies} copies of {trace.num_experts} experts per layer)")
    if predictor_out:
        DomainPredictor.fit(trace, placement, topology).save(predictor_out)
        summary += f"\npredictor: {predictor_out}"
    return summary
