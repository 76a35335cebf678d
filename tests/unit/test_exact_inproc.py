"""The disaggregated forward (attention runner + expert nodes over the inproc transport) and the colocated one
(experts in the runner) against transformers, for every architecture variant; and identical tokens across
microbatch counts and placements."""
import asyncio

import pytest
import torch

from expertmesh.placement.plan import Placement
from tests.inproc_cluster import InprocCluster

PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 200, 300], [42] * 12, [7]]


def reference(model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(params=["mixtral_dir", "qwen3_dir", "qwen3_normed_dir", "deepseek_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("expert_nodes", [3, 0], ids=["disaggregated", "colocated"])
def test_logits_and_greedy_tokens_match_transformers(model_dir, expert_nodes):
    async def run():
        async with InprocCluster(model_dir, num_expert_nodes=expert_nodes) as cluster:
            await cluster.runner.warm_up(64)  # writes to blocks no sequence owns: nothing below may change
            return await cluster.prefill_logits(PROMPTS), await cluster.generate(PROMPTS, 16)

    logits, generated = asyncio.run(run())
    ref = reference(model_dir)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            expected_logits = ref(torch.tensor([prompt])).logits[0, -1]
            assert (expected_logits - logits[i]).abs().max().item() < 1e-4
            mask = torch.ones(1, len(prompt), dtype=torch.long)  # no padding: every prompt id is real
            expected = ref.generate(torch.tensor([prompt]), attention_mask=mask, max_new_tokens=16,
                                    do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
            assert generated[i] == expected


@pytest.mark.parametrize("arch, microbatches", [("mixtral_dir", 2), ("mixtral_dir", 3), ("deepseek_dir", 3)])
def test_microbatches_give_identical_tokens(request, arch, microbatches):
    model_dir = request.getfixturevalue(arch)

    async def run(m):
        async with InprocCluster(model_dir, num_expert_nodes=2, microbatches=m) as cluster:
            return await cluster.generate(PROMPTS, 12)

    assert asyncio.run(run(microbatches)) == asyncio.run(run(1))


@pytest.mark.parametrize("arch", ["mixtral_dir", "deepseek_dir"])
def test_replicated_placement_gives_identical_tokens(request, arch):
    """Every expert on both nodes: replicas are chosen by load (one domain), or by locality when the attention
    node shares a domain with one of them; the same sums either way, other links."""
    model_dir = request.getfixturevalue(arch)

    async def run(placement, expert_domain=None):
        async with InprocCluster(model_dir, placement=placement) as cluster:
            if expert_domain is not None:
                cluster.m2n.attention_domain, cluster.m2n.expert_domain = 1, expert_domain
            tokens = await cluster.generate(PROMPTS, 8)
            return tokens, list(cluster.m2n.stats.messages_sent)

    from expertmesh.model.spec import ModelSpec
    spec = ModelSpec.from_dir(model_dir)
    replicated = Placement(2, {layer: [[1, 0] for _ in range(spec.num_experts)] for layer in spec.moe_layer_ids})
    contiguous_tokens, _ = asyncio.run(run(Placement.contiguous(spec, 2)))
    balanced_tokens, balanced = asyncio.run(run(replicated))
    local_tokens, local = asyncio.run(run(replicated, expert_domain=[0, 1]))
    assert balanced_tokens == contiguous_tokens == local_tokens
    assert min(balanced) > 0  # least loaded: both replicas carry traffic
    assert local[0] == 0 and local[1] > 0  # locality first: node 1 shares the attention node's domain


def test_default_model_served_disaggregated_writes_python_and_french():
    """The shipped model through the serving forward: same greedy tokens as transformers, readable output."""
    from pathlib import Path

    from expertmesh.gateway.text import TextCodec
    model_dir = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"
    codec = TextCodec(model_dir)
    prompts = [codec.encode("import os\n\ndef"), codec.encode("Cette commande permet de")]

    async def run():
        async with InprocCluster(model_dir, num_expert_nodes=2) as cluster:
            return await cluster.generate(prompts, 24)

    generated = asyncio.run(run())
    ref = reference(model_dir)
    with torch.no_grad():
        for prompt, tokens in zip(prompts, generated):
            mask = torch.ones(1, len(prompt), dtype=torch.long)  # id 0 is <s> here, not padding
            assert tokens == ref.generate(torch.tensor([prompt]), attention_mask=mask, max_new_tokens=24,
                                          do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    python, french = codec.decode(generated[0]), codec.decode(generated[1])
    assert "(" in python and ":" in python, python
    assert sum(w in french for w in (" le ", " de ", " la ", " les ", " des ", " est ", " et ", " du ")) >= 2, french


def test_mixed_steps_split_into_decode_and_prefill_microbatches_keep_every_token(mixtral_dir):
    """With graphs on, a step that mixes decodes and prefills runs them as separate microbatches and puts the
    logits back in the scheduler's order; here the graphs are a stand-in that always declines (CPU), so both
    groups run eagerly, and requests arriving one step apart must get the tokens they get alone."""
    from expertmesh.attention_node.scheduler import Sequence
    from expertmesh.transport.protocol import SamplingParams

    class DecliningGraphs:
        def ready_for(self, microbatch, seqs):
            return None

    async def staggered(split):
        async with InprocCluster(mixtral_dir, num_expert_nodes=0) as cluster:
            if split:
                cluster.runner.graphs = DecliningGraphs()
            seqs = [Sequence(f"s{i}", p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), 0)
                    for i, p in enumerate(PROMPTS)]
            step, pending = 0, list(seqs)
            while pending or cluster.scheduler.running or cluster.scheduler.waiting:
                if pending:
                    cluster.scheduler.add(pending.pop(0))  # one arrival per step: mixed steps
                batch = cluster.scheduler.schedule()[::-1]  # newest first: the split must reorder the logits
                step += 1
                logits = await cluster.runner.forward(step, batch, 2)
                for seq, token in zip(batch, logits.argmax(-1).tolist()):
                    cluster.scheduler.advance(seq, token)
            return [s.output_ids for s in seqs]

    assert asyncio.run(staggered(True)) == asyncio.run(staggered(False))
