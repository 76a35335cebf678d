"""The lockstep M2N on GPUs: the attention side in this process on GPU 0, an expert node process (the real entry
point) on GPU 0 over CUDA IPC (one GPU, two processes: time-sliced unless MPS runs) or on GPU 1 over NCCL. Greedy
float32 tokens equal transformers', a decode step, M2N rounds included, never waits on the device, and an expert
node that dies fails the step within the deadline instead of hanging it."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import torch

from expertmesh.attention_node.__main__ import connect_lockstep
from expertmesh.attention_node.model_runner import ModelRunner
from expertmesh.attention_node.scheduler import Scheduler
from expertmesh.config import Config
from expertmesh.kv.block_manager import BlockManager
from expertmesh.kv.cache import PagedKVCache
from expertmesh.launcher.local import free_port
from expertmesh.m2n.dist import close_links
from expertmesh.transport.base import TransportError
from expertmesh.model.spec import ModelSpec
from expertmesh.model.weights import load_attention_side
from expertmesh.placement.plan import load_cluster_placement
from tests.gpu.test_decode_step_gpu import PROMPTS, _decode_logits, reference_tokens
from tests.inproc_cluster import generate

pytestmark = pytest.mark.gpu
_TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
# backend[:expert GPU]: ipc on one GPU (under MPS for concurrency), ipc across two (over NVLink), the same with the
# SM send kernel (ipc-sm: transport.ipc_copy=sm), NCCL across two
BACKENDS = ["ipc", pytest.param("ipc:1", marks=_TWO_GPUS), pytest.param("ipc-sm:1", marks=_TWO_GPUS),
            pytest.param("nccl:1", marks=_TWO_GPUS)]


class LockstepCluster:
    """One attention node here on cuda:0 and one expert node process, on the GPU after the backend's colon (0 if
    none)."""

    def __init__(self, model_dir, tmp_path, backend: str, microbatches: int, max_num_seqs: int = 8,
                 max_len: int = 256, recv_timeout_s: float = 60.0, prefill_graph_tokens: int = 512) -> None:
        backend, _, expert_gpu = backend.partition(":")
        backend, _, copy = backend.partition("-")
        config = Config()
        config.model.path, config.model.device, config.model.dtype = str(model_dir), "cuda", "float32"
        config.transport.backend, config.transport.recv_timeout_s = backend, recv_timeout_s
        config.transport.ipc_copy = copy or "engine"
        config.engine.microbatches, config.engine.max_num_seqs = microbatches, max_num_seqs
        config.engine.prefill_graph_tokens = prefill_graph_tokens
        c = config.cluster
        c.attention_nodes, c.expert_nodes, c.attention_gpus = 1, 1, [0]
        c.expert_gpus = [int(expert_gpu or 0)]
        c.expert_addresses = [f"tcp://127.0.0.1:{free_port()}"]
        c.expert_control_addresses = [f"tcp://127.0.0.1:{free_port()}"]
        c.attention_addresses = [f"tcp://127.0.0.1:{free_port()}"]
        c.dist_address = f"tcp://127.0.0.1:{free_port()}"
        self.config, self.path = config.validate(), tmp_path / "cluster.json"
        config.save(self.path)
        self.spec = ModelSpec.from_dir(model_dir)
        self.microbatches, self.max_len, self.max_num_seqs = microbatches, max_len, max_num_seqs

    async def __aenter__(self) -> "LockstepCluster":
        self.expert = subprocess.Popen([sys.executable, "-m", "expertmesh.expert_node", "--config", str(self.path),
                                        "--index", "0"])
        try:
            await self._start()
        except BaseException:  # the expert node must not outlive a failed start (it would hold its GPU and NCCL),
            self.expert.kill()  # nor this process's half of the links the next test's
            self.expert.wait(30)
            close_links()
            raise
        return self

    async def _start(self) -> None:
        torch.cuda.set_device(0)
        config, spec = self.config, self.spec
        self.m2n = await connect_lockstep(config, spec, load_cluster_placement(config, spec), 0, "cuda:0")
        weights = load_attention_side(config.model.path, spec, torch.float32, "cuda:0")
        blocks = self.max_num_seqs * -(-self.max_len // 16)
        kv = PagedKVCache(spec, blocks, 16, torch.float32, "cuda:0")
        self.runner = ModelRunner(spec, weights, kv, self.m2n, "cuda:0", context_len=self.max_len)
        self.runner.capture_graphs(self.max_num_seqs, self.microbatches, config.engine.graph_prefill_limit())
        self.scheduler = Scheduler(BlockManager(blocks, 16), self.max_num_seqs, config.engine.max_batch_tokens,
                                   self.max_len, spec.eos_token_ids)

    async def __aexit__(self, *exc) -> None:
        self.expert.terminate()
        try:
            self.expert.wait(30)
        except subprocess.TimeoutExpired:  # stuck in C (e.g. an NCCL wait): it still must not outlive the test
            self.expert.kill()
            self.expert.wait(30)
        await self.m2n.close()

    async def generate(self, prompts, max_tokens):
        return await generate(self, prompts, max_tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["mixtral_dir", "qwen3_dir", "deepseek_dir"])
def test_float32_greedy_tokens_match_transformers(request, arch, backend, tmp_path):
    model_dir = request.getfixturevalue(arch)

    async def run():
        async with LockstepCluster(model_dir, tmp_path, backend, microbatches=2) as cluster:
            # ipc keeps its counts on the device: decode steps replay whole-step graphs, rounds included, and no
            # segment graphs are captured beside them (start-up time)
            assert (cluster.runner.step_graphs is not None) == backend.startswith("ipc")
            assert (cluster.runner.graphs is None) == backend.startswith("ipc")
            return await cluster.generate(PROMPTS, 16)

    assert asyncio.run(run()) == reference_tokens(model_dir, PROMPTS, 16)


@pytest.mark.parametrize("backend", ["ipc", pytest.param("ipc:1", marks=_TWO_GPUS)])
@pytest.mark.parametrize("arch", ["mixtral_dir", "qwen3_dir"])
def test_steps_with_prompts_replay_whole_step_graphs_exact_against_transformers(request, arch, backend, tmp_path):
    """Three batch slots for six prompts, two microbatches: steps that mix prompt chunks and decodes replay
    whole-step graphs with their M2N rounds (the expert node captured the same shapes), none runs eagerly, and the
    tokens equal transformers'. The GPU timeline holds each graph's last replay: every segment of both microbatches,
    timed while the tokens were generated."""
    model_dir = request.getfixturevalue(arch)

    async def run():
        async with LockstepCluster(model_dir, tmp_path, backend, microbatches=2, max_num_seqs=3) as cluster:
            started_us = time.time_ns() / 1e3
            tokens = await cluster.generate(PROMPTS, 16)
            timeline = cluster.runner.gpu.timeline()
            spans = {(f"segment {j}", mb) for j in range(len(cluster.runner.moe_points) + 1) for mb in (0, 1)}
            return tokens, cluster.runner.eager_steps, timeline, spans, (started_us, time.time_ns() / 1e3)

    tokens, eager_steps, timeline, spans, (started_us, ended_us) = asyncio.run(run())
    assert tokens == reference_tokens(model_dir, PROMPTS, 16)
    assert eager_steps == 0
    assert {(label.partition(",")[0], row) for label, _, _, row in timeline} == spans
    assert all(label.partition(", ")[2].split()[0] in ("decode", "prefill") for label, _, _, _ in timeline)
    assert all(started_us < start and 0 < duration and start + duration < ended_us
               for _, start, duration, _ in timeline)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_steps_never_wait_on_the_device(mixtral_dir, backend, tmp_path):
    async def run():
        async with LockstepCluster(mixtral_dir, tmp_path, backend, microbatches=2) as cluster:
            # over ipc, steps with prompts replay whole-step graphs too: none of them waits either
            return await _decode_logits(cluster, PROMPTS, 8, check_syncs="all" if backend.startswith("ipc") else True)

    logits = asyncio.run(run())
    assert len(logits) == 8 and all(torch.isfinite(step).all() for step in logits)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["ipc", pytest.param("nccl:1", marks=_TWO_GPUS)])
def test_a_dead_expert_node_fails_the_step_within_the_deadline(mixtral_dir, tmp_path, backend):
    async def run():
        async with LockstepCluster(mixtral_dir, tmp_path, backend, microbatches=2, recv_timeout_s=3.0) as cluster:
            await cluster.generate(PROMPTS[:2], 2)  # serving
            cluster.expert.kill()
            cluster.expert.wait(10)
            started = time.monotonic()
            with pytest.raises(TransportError, match="did not complete within"):
                await cluster.generate(PROMPTS[:2], 2)
            failed_after = time.monotonic() - started
            torch.cuda.synchronize()  # the released waits let the stream drain: nothing stays stuck
            return failed_after

    assert asyncio.run(run()) < 10.0
