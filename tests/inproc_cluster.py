"""An attention node's runner and N expert nodes in one process over the inproc transport (unit tests only)."""
from __future__ import annotations

import asyncio
import itertools

import torch

from expertmesh.attention_node.kv_cache import KVCache
from expertmesh.attention_node.model_runner import ModelRunner
from expertmesh.attention_node.scheduler import Scheduler, Sequence
from expertmesh.attention_node.sampler import sample
from expertmesh.expert_node.node import ExpertNode
from expertmesh.model.spec import ModelSpec
from expertmesh.model.weights import load_attention_side, load_experts
from expertmesh.placement.plan import Placement
from expertmesh.transport.inproc import InprocTransport
from expertmesh.transport.m2n import M2NClient
from expertmesh.transport.protocol import SamplingParams

_names = itertools.count()


class InprocCluster:
    def __init__(self, model_dir, num_expert_nodes: int = 2, placement: Placement | None = None,
                 max_len: int = 256, slots: int = 8, microbatches: int = 1) -> None:
        self.model_dir = model_dir
        self.spec = ModelSpec.from_dir(model_dir)
        self.placement = placement or Placement.contiguous(self.spec, num_expert_nodes)
        self.num_expert_nodes = self.placement.num_expert_nodes
        self.max_len, self.slots, self.microbatches = max_len, slots, microbatches

    async def __aenter__(self) -> "InprocCluster":
        transport = InprocTransport()
        prefix = f"inproc://test{next(_names)}"
        self.listeners, self.tasks = [], []
        for node in range(self.num_expert_nodes):
            listener = await transport.listen(f"{prefix}/expert{node}")
            experts = load_experts(self.model_dir, self.spec, self.placement.pairs_on(node), torch.float32)
            self.listeners.append(listener)
            self.tasks.append(asyncio.create_task(ExpertNode(node, experts, self.spec.num_experts, listener).serve()))
        conns = [await transport.connect(f"{prefix}/expert{n}") for n in range(self.num_expert_nodes)]
        self.m2n = M2NClient(conns, self.placement, 0, recv_timeout_s=10.0)
        await self.m2n.handshake(self.spec.num_layers, self.spec.num_experts, 10.0)
        weights = load_attention_side(self.model_dir, self.spec, torch.float32)
        self.kv = KVCache(self.spec, self.slots, self.max_len, torch.float32, "cpu")
        self.runner = ModelRunner(self.spec, weights, self.kv, self.m2n, "cpu")
        self.scheduler = Scheduler(self.kv, 4096, self.spec.eos_token_ids)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.m2n.close()
        for task in self.tasks:
            task.cancel()
        for listener in self.listeners:
            await listener.close()

    async def prefill_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Logits of the last prompt token of each prompt, one step for all."""
        seqs = [Sequence(f"r{i}", p, SamplingParams(max_tokens=1, temperature=0.0), None) for i, p in enumerate(prompts)]
        for s in seqs:
            self.scheduler.add(s)
        batch = self.scheduler.schedule()
        logits = await self.runner.forward(1, batch, self.microbatches)
        for s in batch:
            self.scheduler.release(s)
        return logits

    async def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Greedy continuous-batching generation of every prompt; ignores eos."""
        seqs = [Sequence(f"g{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), None)
                for i, p in enumerate(prompts)]
        for s in seqs:
            self.scheduler.add(s)
        step = 0
        while self.scheduler.running or self.scheduler.waiting:
            batch = self.scheduler.schedule()
            step += 1
            logits = await self.runner.forward(step, batch, self.microbatches)
            for seq, token in zip(batch, sample(logits, [s.sampling for s in batch], [None] * len(batch))):
                self.scheduler.advance(seq, token)
        return [s.output_ids for s in seqs]
