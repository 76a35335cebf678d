"""The lockstep M2N over NCCL between two GPUs: the attention side in this process on GPU 0, an expert node
process (the real entry point) on GPU 1. Greedy float32 tokens equal transformers', and a decode step, M2N rounds
included, never waits on the device."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch

from expertmesh.attention_node.__main__ import connect_lockstep
from expertmesh.attention_node.model_runner import ModelRunner
from expertmesh.attention_node.sampler import sample_step
from expertmesh.attention_node.scheduler import Scheduler, Sequence
from expertmesh.config import Config
from expertmesh.kv.block_manager import BlockManager
from expertmesh.kv.cache import PagedKVCache
from expertmesh.launcher.local import free_port
from expertmesh.m2n.dist import close_links
from expertmesh.model.spec import ModelSpec
from expertmesh.model.weights import load_attention_side
from expertmesh.placement.plan import load_cluster_placement
from expertmesh.transport.protocol import SamplingParams
from tests.gpu.test_decode_step_gpu import PROMPTS, _decode_logits, reference_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


class TwoGpuCluster:
    """One attention node here on cuda:0 and one expert node process on cuda:1, linked by NCCL."""

    def __init__(self, model_dir, tmp_path, microbatches: int, max_num_seqs: int = 8, max_len: int = 256) -> None:
        config = Config()
        config.model.path, config.model.device, config.model.dtype = str(model_dir), "cuda", "float32"
        config.transport.backend, config.transport.recv_timeout_s = "nccl", 60.0
        config.engine.microbatches, config.engine.max_num_seqs = microbatches, max_num_seqs
        c = config.cluster
        c.attention_nodes, c.expert_nodes, c.attention_gpus, c.expert_gpus = 1, 1, [0], [1]
        c.expert_addresses = [f"tcp://127.0.0.1:{free_port()}"]
        c.expert_control_addresses = [f"tcp://127.0.0.1:{free_port()}"]
        c.attention_addresses = [f"tcp://127.0.0.1:{free_port()}"]
        c.dist_address = f"tcp://127.0.0.1:{free_port()}"
        self.config, self.path = config.validate(), tmp_path / "cluster.json"
        config.save(self.path)
        self.spec = ModelSpec.from_dir(model_dir)
        self.microbatches, self.max_len, self.max_num_seqs = microbatches, max_len, max_num_seqs

    async def __aenter__(self) -> "TwoGpuCluster":
        self.expert = subprocess.Popen([sys.executable, "-m", "expertmesh.expert_node", "--config", str(self.path),
                                        "--index", "0"])
        torch.cuda.set_device(0)
        config, spec = self.config, self.spec
        self.m2n = await connect_lockstep(config, spec, load_cluster_placement(config, spec), 0, "cuda:0")
        weights = load_attention_side(config.model.path, spec, torch.float32, "cuda:0")
        blocks = self.max_num_seqs * -(-self.max_len // 16)
        kv = PagedKVCache(spec, blocks, 16, torch.float32, "cuda:0")
        self.runner = ModelRunner(spec, weights, kv, self.m2n, "cuda:0", context_len=self.max_len)
        self.runner.capture_graphs(self.max_num_seqs, self.microbatches)
        self.scheduler = Scheduler(BlockManager(blocks, 16), self.max_num_seqs, config.engine.max_batch_tokens,
                                   self.max_len, spec.eos_token_ids)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.m2n.close()
        self.expert.terminate()
        self.expert.wait(30)
        close_links()

    async def generate(self, prompts, max_tokens):
        seqs = [Sequence(f"g{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), 0)
                for i, p in enumerate(prompts)]
        for s in seqs:
            self.scheduler.add(s)
        step = 0
        while self.scheduler.running or self.scheduler.waiting:
            batch = self.scheduler.schedule()
            step += 1
            logits = await self.runner.forward(step, batch, self.microbatches)
            for seq, token in zip(batch, sample_step(logits, batch)[0]):
                self.scheduler.advance(seq, token)
        return [s.output_ids for s in seqs]


@pytest.mark.parametrize("arch", ["mixtral_dir", "qwen3_dir"])
def test_float32_greedy_tokens_over_nccl_match_transformers(request, arch, tmp_path):
    model_dir = request.getfixturevalue(arch)

    async def run():
        async with TwoGpuCluster(model_dir, tmp_path, microbatches=2) as cluster:
            return await cluster.generate(PROMPTS, 16)

    assert asyncio.run(run()) == reference_tokens(model_dir, PROMPTS, 16)


def test_decode_steps_over_nccl_never_wait_on_the_device(mixtral_dir, tmp_path):
    async def run():
        async with TwoGpuCluster(mixtral_dir, tmp_path, microbatches=2) as cluster:
            return await _decode_logits(cluster, PROMPTS, 8, check_syncs=True)

    logits = asyncio.run(run())
    assert len(logits) == 8 and all(torch.isfinite(step).all() for step in logits)
