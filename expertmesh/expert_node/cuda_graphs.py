"""CUDA graphs of the expert node's fused MoE: one per (layer, token bucket), replayed for whatever arrived.

The tokens that arrived for a layer are gathered straight into the bucket's static buffers; padding rows carry
expert id -1, which adds nothing. Larger batches (long prefills) run eagerly."""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from ..cuda_graph import bucket_sizes, capture
from ..ops.fused_moe import StackedExperts

log = logging.getLogger(__name__)


class ExpertGraphs:
    def __init__(self, experts_of_layer: dict[int, StackedExperts], top_k: int, max_tokens: int,
                 compute: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.sizes = bucket_sizes(max_tokens)
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        self.static: dict[tuple[int, int], tuple] = {}  # (layer, size) -> (graph, hidden, ids, weights, out)
        with torch.no_grad():
            for size in reversed(self.sizes):  # largest first: the pool fits them all
                for layer, stacked in experts_of_layer.items():
                    device, dtype = stacked.gate_up.device, stacked.gate_up.dtype
                    hidden = torch.zeros(size, stacked.hidden, dtype=dtype, device=device)
                    ids = torch.full((size, top_k), -1, dtype=torch.int32, device=device)
                    weights = torch.zeros(size, top_k, dtype=torch.float32, device=device)
                    graph, out = capture(lambda: compute(layer, hidden, ids, weights), pool)
                    self.static[(layer, size)] = (graph, hidden, ids, weights, out)
        torch.cuda.synchronize()
        log.info("captured %d CUDA graphs (%d layers x buckets up to %d tokens) in %.1f s", len(self.static),
                 len(experts_of_layer), self.sizes[-1], time.monotonic() - started)

    def run(self, layer: int, hidden: list[torch.Tensor], ids: list[torch.Tensor],
            weights: list[torch.Tensor]) -> torch.Tensor | None:
        """The layer's partial sums for the concatenated pieces, or None when too many tokens for any bucket."""
        tokens = sum(h.shape[0] for h in hidden)
        size = next((s for s in self.sizes if s >= tokens), None)
        if size is None or (layer, size) not in self.static:
            return None
        graph, static_hidden, static_ids, static_weights, out = self.static[(layer, size)]
        torch.cat(hidden, out=static_hidden[:tokens])
        torch.cat(ids, out=static_ids[:tokens])
        torch.cat(weights, out=static_weights[:tokens])
        static_ids[tokens:].fill_(-1)
        graph.replay()
        return out[:tokens].clone()  # the next replay reuses `out`; a send may still be reading this
