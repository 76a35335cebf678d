"""Which domain's experts a request will use, from its prompt tokens alone (what the gateway knows before prefill):
per token id, smoothed shares of its routing mass on each domain's experts; a prompt sums its tokens' log-shares."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import Placement
from .topology import Topology
from .trace import RoutingTrace


def holder_domains(placement: Placement, topology: Topology) -> np.ndarray:
    """[L, E, D] bool: expert e of layer index l has a copy in domain d (layers in sorted order)."""
    layers = sorted(placement.nodes_of)
    experts = len(placement.nodes_of[layers[0]])
    held = np.zeros((len(layers), experts, topology.num_domains), bool)
    for index, layer in enumerate(layers):
        for expert, nodes in enumerate(placement.nodes_of[layer]):
            for node in nodes:
                held[index, expert, topology.expert_domain[node]] = True
    return held


def domain_mass(trace: RoutingTrace, held: np.ndarray) -> np.ndarray:
    """[T, D]: share of each token's routing mass (all layers) on experts with a copy in domain d; an expert held
    in several domains counts fully for each, since a request sent to any of them finds it local."""
    num_layers = trace.expert_ids.shape[1]
    mass = np.zeros((trace.num_tokens, held.shape[2]))
    weights = trace.expert_weights.astype(np.float64)
    for index in range(num_layers):
        for slot in range(trace.expert_ids.shape[2]):
            mass += weights[:, index, slot, None] * held[index, trace.expert_ids[:, index, slot].astype(np.int64)]
    return mass / num_layers


def request_targets(mass: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """[R, D]: summed domain mass of each request's tokens; its argmax is the domain the request should go to."""
    cumulative = np.vstack([np.zeros((1, mass.shape[1])), np.cumsum(mass, axis=0)])
    return cumulative[spans[:, 1]] - cumulative[spans[:, 0]]


@dataclass
class DomainPredictor:
    log_likelihood: np.ndarray  # [V, D] log P(domain | token id), smoothed
    alpha: float

    @classmethod
    def fit(cls, trace: RoutingTrace, placement: Placement, topology: Topology, alpha: float = 0.5,
            vocab_size: int | None = None) -> "DomainPredictor":
        """Each token occurrence adds its normalised domain mass to its token id's row; rare ids stay near uniform."""
        mass = domain_mass(trace, holder_domains(placement, topology))
        mass = mass / np.maximum(mass.sum(axis=1, keepdims=True), 1e-12)
        vocab = max(int(trace.token_ids.max()) + 1, vocab_size or 0)
        counts = np.zeros((vocab, topology.num_domains))
        np.add.at(counts, trace.token_ids.astype(np.int64), mass)
        smoothed = (counts + alpha) / (counts.sum(axis=1, keepdims=True) + alpha * topology.num_domains)
        return cls(np.log(smoothed), alpha)

    @property
    def num_domains(self) -> int:
        return int(self.log_likelihood.shape[1])

    def scores(self, token_ids: np.ndarray | list[int]) -> np.ndarray:
        """[D] summed log-likelihoods; token ids never seen in fitting score uniformly."""
        ids = np.asarray(token_ids, np.int64)
        known = ids[(ids >= 0) & (ids < self.log_likelihood.shape[0])]
        return self.log_likelihood[known].sum(axis=0)

    def predict(self, token_ids: np.ndarray | list[int]) -> tuple[int, np.ndarray]:
        """(domain, scores); ties to the lowest domain."""
        scores = self.scores(token_ids)
        return int(np.argmax(scores)), scores

    def save(self, path: str) -> None:
        np.savez_compressed(path, log_likelihood=self.log_likelihood.astype(np.float32), alpha=np.float64(self.alpha))

    @classmethod
    def load(cls, path: str) -> "DomainPredictor":
        with np.load(path) as data:
            return cls(data["log_likelihood"].astype(np.float64), float(data["alpha"]))


def accuracy(predictor: DomainPredictor, trace: RoutingTrace, placement: Placement, topology: Topology,
             spans: np.ndarray, prompt_tokens: int) -> float:
    """Share of requests whose prediction from the first prompt_tokens tokens is the domain holding most of the
    routing mass of the rest of the request (spans shorter than prompt_tokens + 1 are skipped)."""
    spans = spans[spans[:, 1] - spans[:, 0] > prompt_tokens]
    if len(spans) == 0:
        raise ValueError(f"no request longer than prompt_tokens={prompt_tokens}")
    mass = domain_mass(trace, holder_domains(placement, topology))
    target = request_targets(mass, np.stack([spans[:, 0] + prompt_tokens, spans[:, 1]], axis=1)).argmax(axis=1)
    predicted = np.array([predictor.predict(trace.token_ids[s:s + prompt_tokens])[0] for s in spans[:, 0]])
    return float((predicted == target).mean())
