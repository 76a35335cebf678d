"""Replays a routing trace on a cluster of any size: requests to attention nodes by a policy, each token sent once to
each distinct expert node holding one of its experts (replica by choose_replica), one partial sum back; bytes, load."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .coactivation import split_requests
from .plan import Placement
from .predictor import DomainPredictor
from .topology import Topology
from .trace import RoutingTrace


@dataclass
class CostModel:
    hidden_size: int  # activation width: bytes per token per destination = hidden_size * dtype_bytes, each way
    dtype_bytes: int = 2
    expert_us_per_token: float = 2.0  # one token through one expert FFN on an expert node
    attention_us_per_token: float = 5.0  # one token through one layer's attention on an attention node
    tokens_per_attention_node: int = 64  # decode batch per attention node per step

    @property
    def bytes_per_message(self) -> int:
        return self.hidden_size * self.dtype_bytes


@dataclass
class Workload:
    """Requests are spans of documents: the first prompt_tokens are the prompt (what the predictor sees), the rest
    the generated tokens that are replayed and counted; they arrive in waves of requests that run together."""
    spans: np.ndarray  # [R, 2] token spans in arrival order
    prompt_tokens: int
    requests_per_wave: int  # requests that run together (assignment and load balance are per wave)

    @property
    def sizes(self) -> np.ndarray:
        """Generated tokens per request."""
        return self.spans[:, 1] - self.spans[:, 0] - self.prompt_tokens


def make_workload(trace: RoutingTrace, topology: Topology, tokens_per_request: int = 256, prompt_tokens: int = 64,
                  requests_per_attention_node: int = 8, seed: int = 0) -> Workload:
    """Documents cut into requests of tokens_per_request (those without a generated token dropped), shuffled."""
    spans = split_requests(trace, tokens_per_request, min_tokens=prompt_tokens + 1)
    order = np.random.default_rng(seed).permutation(len(spans))
    return Workload(spans[order], prompt_tokens, requests_per_attention_node * topology.attention_nodes)


def assign_round_robin(workload: Workload, topology: Topology) -> np.ndarray:
    """[R] attention node of each request: in turn."""
    return np.arange(len(workload.spans)) % topology.attention_nodes


def assign_rebatch(workload: Workload, topology: Topology, scores: np.ndarray, domain_slack: float = 0.0) -> np.ndarray:
    """[R] attention node: per wave, most confident requests first, each to the least loaded attention node of its
    best-scoring domain if that node stays within attention_load_bound x the wave's mean and the domain within
    (1 + domain_slack) x its expert nodes' share of the wave, else the next domain by score, else the least loaded
    attention node. scores[r, d]: the predictor's scores (higher = more likely). The domain cap is there because
    replicas are chosen in the sender's domain first: a domain sent more tokens loads its expert nodes that much more,
    so expert-node balance needs domain volumes balanced more tightly than attention nodes."""
    node_of = np.empty(len(workload.spans), np.int64)
    sizes = workload.sizes.astype(np.float64)
    members = [topology.attention_nodes_in(d) for d in range(topology.num_domains)]
    share = np.bincount(topology.expert_domain, minlength=topology.num_domains) / topology.expert_nodes
    ordered = np.sort(scores, axis=1)
    margin = ordered[:, -1] - (ordered[:, -2] if scores.shape[1] > 1 else 0.0)
    for start in range(0, len(sizes), workload.requests_per_wave):
        wave = np.arange(start, min(start + workload.requests_per_wave, len(sizes)))
        node_cap = topology.attention_load_bound * sizes[wave].sum() / topology.attention_nodes
        domain_cap = (1 + domain_slack) * sizes[wave].sum() * share
        load = np.zeros(topology.attention_nodes)
        volume = np.zeros(topology.num_domains)
        for r in wave[np.argsort(-margin[wave], kind="stable")]:
            node = None
            for d in np.argsort(-scores[r], kind="stable"):
                if not members[d] or volume[d] + sizes[r] > domain_cap[d]:
                    continue
                candidate = min(members[d], key=lambda n: load[n])
                if load[candidate] + sizes[r] <= node_cap:
                    node = candidate
                    break
            if node is None:
                node = int(np.argmin(load))
            node_of[r] = node
            load[node] += sizes[r]
            volume[topology.attention_domain[node]] += sizes[r]
    return node_of


def predictor_scores(predictor: DomainPredictor, trace: RoutingTrace, workload: Workload) -> np.ndarray:
    """[R, D] the predictor's scores of each request's prompt."""
    return np.stack([predictor.scores(trace.token_ids[s:s + workload.prompt_tokens]) for s in workload.spans[:, 0]])


@dataclass
class SimulationReport:
    tokens: int  # generated tokens replayed
    cross_domain_bytes_per_token: float  # both ways, all MoE layers
    intra_domain_bytes_per_token: float
    cost_per_token: float  # bytes weighted by the topology's per-byte costs
    fanout: float  # distinct expert nodes per token per layer
    expert_load_max_over_mean: float  # worst layer; load = tokens dispatched to a node over the replay
    expert_load_per_layer: list[float]
    attention_load_max_over_mean: float  # generated tokens per attention node over the replay
    step_time_us: float
    step_comm_us: float
    step_compute_us: float

    def to_dict(self) -> dict:
        return asdict(self)


def _split_integer(load: np.ndarray, amount: int) -> np.ndarray:
    """Integer shares of `amount` that bring the lowest loads up to a common level (least-loaded choice, in bulk)."""
    levels = np.sort(load)
    for count in range(1, len(levels) + 1):
        level = (levels[:count].sum() + amount) / count
        if count == len(levels) or level <= levels[count]:
            break
    share = np.floor(np.maximum(level - load, 0)).astype(np.int64)
    for n in np.argsort(load + share, kind="stable")[:amount - int(share.sum())]:
        share[n] += 1
    return share


def replay(trace: RoutingTrace, workload: Workload, attention_node_of: np.ndarray, placement: Placement,
           topology: Topology, cost: CostModel, spill: bool = False) -> SimulationReport:
    """The generated tokens of every request, wave by wave. Replicas are chosen as choose_replica does (with spill:
    spill_above = load_bound x mean node load), in bulk per wave, expert and sender domain.

    Modelled step time, deliberately simple: a step = every attention node decoding tokens_per_attention_node tokens
    through all MoE layers, the replay's per-node totals scaled to one step. Per layer: communication = dispatch +
    combine, each the slowest node's max(intra bytes / intra bandwidth, inter bytes / inter bandwidth); then the
    slowest expert node's selections x expert_us_per_token; then the slowest attention node's tokens x
    attention_us_per_token; no overlap between them."""
    layers = sorted(placement.nodes_of)
    num_layers, num_nodes, num_attention = len(layers), topology.expert_nodes, topology.attention_nodes
    node_domain = np.array(topology.expert_domain)
    attention_domain = np.array(topology.attention_domain)
    received = np.zeros((num_layers, num_nodes))  # tokens dispatched to each expert node
    work = np.zeros((num_layers, num_nodes))  # selections computed by each expert node
    expert_bytes = np.zeros((num_layers, num_nodes, 2))  # [.., 0] intra, [.., 1] inter; one way
    attention_bytes = np.zeros((num_layers, num_attention, 2))
    attention_tokens = np.zeros(num_attention)
    messages = cross = 0
    tokens = 0
    for start in range(0, len(workload.spans), workload.requests_per_wave):
        wave = np.arange(start, min(start + workload.requests_per_wave, len(workload.spans)))
        token_index = np.concatenate([np.arange(s + workload.prompt_tokens, e) for s, e in workload.spans[wave]])
        sender = np.repeat(attention_node_of[wave], workload.sizes[wave])
        domain = attention_domain[sender]
        np.add.at(attention_tokens, sender, 1)
        tokens += len(token_index)
        for index, layer in enumerate(layers):
            ids = trace.expert_ids[token_index, index, :].astype(np.int64)  # [n, k]
            node = np.full(ids.shape, -1, np.int64)
            pending = np.zeros(num_nodes)  # this wave's choices so far, so later groups see them
            for expert, holders in enumerate(placement.nodes_of[layer]):
                where = np.nonzero(ids == expert)
                if len(where[0]) == 0:
                    continue
                if len(holders) == 1:
                    node[where] = holders[0]
                    continue
                for d in np.unique(domain[where[0]]):
                    picked = tuple(w[domain[where[0]] == d] for w in where)
                    local = [h for h in holders if node_domain[h] == d] or list(holders)
                    if spill:
                        current = received[index] + pending
                        if current[local].min() > topology.load_bound * current.mean():
                            local = list(holders)
                    share = _split_integer(received[index, local] + pending[local], len(picked[0]))
                    node[picked] = np.repeat(local, share)
                    pending[local] += share
            work[index] += np.bincount(node.reshape(-1), minlength=num_nodes)
            ordered = np.sort(node, axis=1)
            distinct = np.ones(ordered.shape, bool)
            distinct[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
            rows, cols = np.nonzero(distinct)
            dest = ordered[rows, cols]
            is_cross = (node_domain[dest] != domain[rows]).astype(np.int64)
            received[index] += np.bincount(dest, minlength=num_nodes)
            np.add.at(expert_bytes[index], (dest, is_cross), cost.bytes_per_message)
            np.add.at(attention_bytes[index], (sender[rows], is_cross), cost.bytes_per_message)
            messages += len(dest)
            cross += int(is_cross.sum())
    both_ways = 2 * cost.bytes_per_message
    per_layer = received.max(axis=1) / np.maximum(received.mean(axis=1), 1e-12)
    # one step = tokens_per_attention_node tokens on every attention node; node totals scaled to it
    scale = cost.tokens_per_attention_node * num_attention / max(tokens, 1)
    bandwidth = np.array([topology.intra_bandwidth_gbps, topology.inter_bandwidth_gbps]) * 1e9 / 8 / 1e6  # bytes/us
    comm = 2 * np.maximum((expert_bytes * scale / bandwidth).max(axis=2).max(axis=1),
                          (attention_bytes * scale / bandwidth).max(axis=2).max(axis=1))
    compute = (work * scale).max(axis=1) * cost.expert_us_per_token + \
        attention_tokens.max() * scale * cost.attention_us_per_token
    return SimulationReport(
        tokens=tokens, cross_domain_bytes_per_token=cross * both_ways / max(tokens, 1),
        intra_domain_bytes_per_token=(messages - cross) * both_ways / max(tokens, 1),
        cost_per_token=((messages - cross) * topology.intra_cost_per_byte + cross * topology.inter_cost_per_byte)
        * both_ways / max(tokens, 1),
        fanout=messages / max(tokens * num_layers, 1), expert_load_max_over_mean=float(per_layer.max()),
        expert_load_per_layer=[round(float(x), 4) for x in per_layer],
        attention_load_max_over_mean=float(attention_tokens.max() / max(attention_tokens.mean(), 1e-12)),
        step_time_us=float((comm + compute).sum()), step_comm_us=float(comm.sum()),
        step_compute_us=float(compute.sum()))


def domain_demand(trace: RoutingTrace, workload: Workload, attention_node_of: np.ndarray, topology: Topology,
                  num_layers: int) -> np.ndarray:
    """[D, L, E] selections of each expert by the generated tokens of requests sent to each attention domain
    (what replicate() needs to put replicas where their users are)."""
    demand = np.zeros((topology.num_domains, num_layers, trace.num_experts))
    for r, (s, e) in enumerate(workload.spans):
        d = topology.attention_domain[attention_node_of[r]]
        ids = trace.expert_ids[s + workload.prompt_tokens:e].astype(np.int64)
        for index in range(num_layers):
            demand[d, index] += np.bincount(ids[:, index].reshape(-1), minlength=trace.num_experts)
    return demand


def contiguous_placement(trace: RoutingTrace, topology: Topology) -> Placement:
    """The default cluster placement (Placement.contiguous) for the trace's model, without loading the model."""
    from types import SimpleNamespace
    shape = SimpleNamespace(num_experts=trace.num_experts, moe_layer_ids=[int(x) for x in trace.moe_layers])
    return Placement.contiguous(shape, topology.expert_nodes)  # type: ignore[arg-type]


def compare_strategies(fit: RoutingTrace, held_out: RoutingTrace, topology: Topology, cost: CostModel,
                       tokens_per_request: int = 256, prompt_tokens: int = 64, seed: int = 0) -> list[dict]:
    """Placements and predictors fitted on `fit`, replayed on `held_out`: the contiguous/round-robin baseline, a
    load-only (EPLB-like) replication, co-activation placement alone, rebatching alone, and the combinations.
    One dict per strategy; `reduction` is relative to the first row's cross-domain bytes per token."""
    from .coactivation import coactivation, split_requests as split
    from .partition import place
    from .predictor import accuracy
    from .replication import replicate_by_load
    contiguous = contiguous_placement(fit, topology)
    load = coactivation(fit, split(fit, tokens_per_request)).load
    placements = {"contiguous": contiguous, "eplb": replicate_by_load(contiguous, topology, load),
                  "coactivation": place(fit, topology, replicate_hot=False, tokens_per_request=tokens_per_request,
                                        seed=seed),
                  "coactivation+replicas": place(fit, topology, replicate_hot=True,
                                                 tokens_per_request=tokens_per_request, seed=seed)}
    strategies = [("contiguous", "round_robin", False), ("eplb", "round_robin", False),
                  ("eplb", "round_robin", True), ("coactivation", "round_robin", False),
                  ("contiguous", "rebatch", False), ("coactivation", "rebatch", False), ("eplb", "rebatch", False),
                  ("coactivation+replicas", "round_robin", False), ("coactivation+replicas", "rebatch", False),
                  ("coactivation+replicas", "rebatch", True)]
    rows = []
    predictors = {}
    for name, policy, spill in strategies:
        placement = placements[name]
        row = {"placement": name, "policy": policy, "spill": spill, "domains": topology.num_domains,
               "attention_nodes": topology.attention_nodes, "expert_nodes": topology.expert_nodes,
               "copies_per_layer": sum(len(nodes) for nodes in next(iter(placement.nodes_of.values())))}
        for label, trace in (("held_out", held_out), ("fit", fit)):
            workload = make_workload(trace, topology, tokens_per_request, prompt_tokens, seed=seed)
            if policy == "rebatch":
                if name not in predictors:
                    predictors[name] = DomainPredictor.fit(fit, placement, topology)
                predictor = predictors[name]
                node_of = assign_rebatch(workload, topology, predictor_scores(predictor, trace, workload))
                if label == "held_out":
                    row["predictor_accuracy"] = accuracy(predictor, trace, placement, topology, workload.spans,
                                                         prompt_tokens)
            else:
                node_of = assign_round_robin(workload, topology)
            report = replay(trace, workload, node_of, placement, topology, cost, spill=spill)
            if label == "held_out":
                row.update(report.to_dict())
            else:
                row["fit_expert_load_max_over_mean"] = report.expert_load_max_over_mean
        rows.append(row)
    for row in rows:
        row["reduction"] = 1 - row["cross_domain_bytes_per_token"] / max(rows[0]["cross_domain_bytes_per_token"], 1e-12)
    return rows


def simulate_files(trace_path: str | None, cluster_path: str, placement_path: str | None, policy: str,
                   predictor_path: str | None = None, fit_trace_path: str | None = None, hidden_size: int | None = None,
                   dtype_bytes: int = 2, tokens_per_request: int = 256, prompt_tokens: int = 64,
                   seed: int = 0, spill: bool = False, shape: str | None = None,
                   synthetic_docs: int = 64) -> SimulationReport:
    """`expertmesh simulate`: files in, one replay's report out. shape: a named model shape (model/shapes.py) whose
    hidden size the messages have and, without a trace, whose routing a synthetic trace follows."""
    from pathlib import Path

    from ..model.spec import ModelSpec
    if shape is not None:
        from ..model.shapes import shape as named_shape
        from .synthetic import synthetic_trace
        name, spec = named_shape(shape)
        hidden_size = hidden_size or spec.hidden_size
    if trace_path is not None:
        trace = RoutingTrace.load(trace_path)
    elif shape is not None:
        trace = synthetic_trace(spec, name, num_docs=synthetic_docs, seed=seed)
    else:
        raise ValueError("give a routing trace (--trace) or a model shape to synthesize one (--shape)")
    topology = Topology.load(cluster_path)
    if hidden_size is None:
        if not (Path(trace.model) / "config.json").is_file():
            raise ValueError(f"no --hidden-size given and the trace's model {trace.model!r} has no config.json")
        hidden_size = ModelSpec.from_dir(trace.model).hidden_size
    placement = Placement.from_json(Path(placement_path).read_text()) if placement_path else \
        contiguous_placement(trace, topology)
    if placement.num_expert_nodes != topology.expert_nodes:
        raise ValueError(f"placement {placement_path!r} is for {placement.num_expert_nodes} expert nodes, "
                         f"cluster {cluster_path!r} has {topology.expert_nodes}")
    workload = make_workload(trace, topology, tokens_per_request, prompt_tokens, seed=seed)
    if policy == "round_robin":
        node_of = assign_round_robin(workload, topology)
    elif policy == "rebatch":
        predictor = DomainPredictor.load(predictor_path) if predictor_path else \
            DomainPredictor.fit(RoutingTrace.load(fit_trace_path) if fit_trace_path else trace, placement, topology)
        if predictor.num_domains != topology.num_domains:
            raise ValueError(f"predictor {predictor_path!r} knows {predictor.num_domains} domains, "
                             f"cluster has {topology.num_domains}")
        node_of = assign_rebatch(workload, topology, predictor_scores(predictor, trace, workload))
    else:
        raise ValueError(f"policy {policy!r}; choose round_robin or rebatch")
    return replay(trace, workload, node_of, placement, topology, CostModel(hidden_size, dtype_bytes), spill)
