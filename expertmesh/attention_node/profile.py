"""`expertmesh profile`: runs a model over text in one process and records every token's routing.

The forward is the serving forward (ModelRunner) with the expert nodes replaced by local experts that
also record what the router chose, so the trace is exactly what a cluster would dispatch."""
from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .model_runner import ModelRunner
from .scheduler import Sequence
from ..config import EngineConfig
from ..gateway.text import TextCodec
from ..kv.block_manager import BlockManager
from ..kv.cache import PagedKVCache
from ..model.spec import ModelSpec
from ..model.weights import load_attention_side, load_experts
from ..ops.fused_moe import StackedExperts, fused_moe
from ..transport.protocol import SamplingParams
from ..placement.trace import RoutingTrace


@dataclass
class Document:
    text: str
    doc_id: str
    domain: str | None


def read_documents(path: str | Path) -> Iterator[Document]:
    """JSONL with {"text", "domain"?, "doc_id"?} per line, or any other file as one plain-text document."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open() as handle:
            for number, line in enumerate(handle):
                if line.strip():
                    record = json.loads(line)
                    if "text" not in record:
                        raise ValueError(f"{path}:{number + 1}: a JSONL record needs a 'text' field")
                    yield Document(record["text"], str(record.get("doc_id", number)), record.get("domain"))
    else:
        yield Document(path.read_text(), path.name, None)


class RecordingExperts:
    """Stands in for M2NClient: computes every expert locally and keeps each layer's routing."""

    def __init__(self, experts: dict[int, StackedExperts]) -> None:
        self.experts_of_layer = experts
        self.routes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    async def begin_step(self, step, tokens):
        pass

    async def end_step(self, step, event=None):
        pass

    async def dispatch(self, step, layer, microbatch, hidden, expert_ids, expert_weights):
        self.routes[layer] = (expert_ids, expert_weights)
        return fused_moe(hidden, expert_ids, expert_weights, self.experts_of_layer[layer])

    async def gather(self, handle):
        return handle

    @staticmethod
    def reduce(handle, partial, like):
        return partial


def profile(model_dir: str | Path, data: str | Path, out: str | Path, window: int = 256, batch_windows: int = 16,
            max_tokens: int | None = None, progress=sys.stderr) -> RoutingTrace:
    spec = ModelSpec.from_dir(model_dir)
    codec = TextCodec(model_dir)
    weights = load_attention_side(model_dir, spec, torch.float32)
    experts = RecordingExperts(load_experts(model_dir, spec, [(l, e) for l in spec.moe_layer_ids
                                                              for e in range(spec.num_experts)], torch.float32))
    window = min(window, spec.max_position_embeddings)
    block_size = EngineConfig().block_size
    blocks = BlockManager(batch_windows * -(-window // block_size), block_size)
    kv = PagedKVCache(spec, blocks.num_blocks, block_size, torch.float32, "cpu")
    runner = ModelRunner(spec, weights, kv, experts, "cpu")  # type: ignore[arg-type]
    doc_ids, domains = [], []
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("token_ids", "doc_index", "domain_index", "ids", "w")}
    pending: list[tuple[list[int], int, int]] = []
    started, done_tokens = time.monotonic(), 0
    last_report = started

    def run_batch() -> None:
        nonlocal done_tokens, last_report
        seqs = [Sequence(str(i), ids, SamplingParams(max_tokens=1), 0) for i, (ids, _, _) in enumerate(pending)]
        for seq in seqs:
            blocks.allocate(seq)
        with torch.no_grad():
            asyncio.run(runner.forward(0, seqs, 1))
        for seq in seqs:
            blocks.free(seq)
        columns["token_ids"].append(np.concatenate([np.array(ids, np.int32) for ids, _, _ in pending]))
        columns["doc_index"].append(np.concatenate([np.full(len(ids), d, np.int32) for ids, d, _ in pending]))
        columns["domain_index"].append(np.concatenate([np.full(len(ids), k, np.int16) for ids, _, k in pending]))
        layers = spec.moe_layer_ids
        columns["ids"].append(np.stack([experts.routes[l][0].numpy().astype(np.int16) for l in layers], axis=1))
        columns["w"].append(np.stack([experts.routes[l][1].numpy().astype(np.float16) for l in layers], axis=1))
        done_tokens += sum(len(ids) for ids, _, _ in pending)
        pending.clear()
        now = time.monotonic()
        if progress is not None and now - last_report > 2.0:
            print(f"profile: {done_tokens} tokens, {len(doc_ids)} documents, "
                  f"{done_tokens / (now - started):.0f} tokens/s", file=progress, flush=True)
            last_report = now

    for doc in read_documents(data):
        if max_tokens is not None and done_tokens + sum(len(p[0]) for p in pending) >= max_tokens:
            break
        if doc.domain is not None and doc.domain not in domains:
            domains.append(doc.domain)
        doc_ids.append(doc.doc_id)
        token_ids = codec.encode(doc.text)
        domain_index = domains.index(doc.domain) if doc.domain is not None else -1
        for start in range(0, len(token_ids), window):
            pending.append((token_ids[start:start + window], len(doc_ids) - 1, domain_index))
            if len(pending) == batch_windows:
                run_batch()
    if pending:
        run_batch()
    if not columns["token_ids"]:
        raise ValueError(f"no text in {str(data)!r}")
    trace = RoutingTrace(np.concatenate(columns["token_ids"]), np.concatenate(columns["doc_index"]),
                         np.concatenate(columns["domain_index"]), np.concatenate(columns["ids"]),
                         np.concatenate(columns["w"]), np.array(spec.moe_layer_ids, np.int32), doc_ids, domains,
                         spec.num_experts, str(model_dir))
    trace.save(out)
    if progress is not None:
        print(f"profile: {trace.num_tokens} tokens from {len(doc_ids)} documents -> {out}", file=progress)
    return trace
