"""Routing traces: which experts every token of a text chose at every MoE layer, on disk as .npz.

Format (numpy arrays in one npz; T tokens, L MoE layers, k = top_k):
  token_ids int32 [T]; doc_index int32 [T] (into doc_ids); domain_index int16 [T] (into domains, -1 = none);
  expert_ids int16 [T, L, k]; expert_weights float16 [T, L, k]; moe_layers int32 [L];
  doc_ids str [D]; domains str [K]; num_experts int32 []; model str []."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class RoutingTrace:
    token_ids: np.ndarray
    doc_index: np.ndarray
    domain_index: np.ndarray
    expert_ids: np.ndarray
    expert_weights: np.ndarray
    moe_layers: np.ndarray
    doc_ids: list[str]
    domains: list[str]
    num_experts: int
    model: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, token_ids=self.token_ids, doc_index=self.doc_index,
                            domain_index=self.domain_index, expert_ids=self.expert_ids,
                            expert_weights=self.expert_weights, moe_layers=self.moe_layers,
                            doc_ids=np.array(self.doc_ids, dtype=str), domains=np.array(self.domains, dtype=str),
                            num_experts=np.int32(self.num_experts), model=np.array(self.model))

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["token_ids"], data["doc_index"], data["domain_index"], data["expert_ids"],
                       data["expert_weights"], data["moe_layers"], [str(d) for d in data["doc_ids"]],
                       [str(d) for d in data["domains"]], int(data["num_experts"]), str(data["model"]))
