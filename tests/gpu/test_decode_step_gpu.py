"""Whole decode steps on the GPU: exact against transformers in float32 (colocated and disaggregated, CUDA graphs
on), no host sync inside a decode step, graphs replaying what the eager path computes, and bf16 kernels agreeing
with the torch reference ops under teacher forcing."""
import asyncio
import functools
from pathlib import Path

import pytest
import torch

from expertmesh.attention_node.scheduler import Sequence
from expertmesh.transport.protocol import SamplingParams
from tests.inproc_cluster import InprocCluster, kernel_ops, teacher_forced_argmaxes, teacher_forcing_case

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 200, 300], [42] * 12, [7], list(range(3, 40)), [9, 9]]


def reference_tokens(model_dir, prompts, new_tokens):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]


@pytest.mark.parametrize("expert_nodes, microbatches", [(0, 1), (2, 1), (2, 2)],
                         ids=["colocated", "disaggregated", "disaggregated-m2"])
@pytest.mark.parametrize("arch", ["mixtral_dir", "qwen3_dir", "deepseek_dir"])
def test_float32_greedy_tokens_match_transformers_with_cuda_graphs(request, arch, expert_nodes, microbatches):
    """m2: two microbatches replay their segment graphs interleaved (ping-pong), each in a memory pool of its own
    (SegmentGraphs.capture says why)."""
    model_dir = request.getfixturevalue(arch)

    async def run():
        async with InprocCluster(model_dir, num_expert_nodes=expert_nodes, device="cuda", cuda_graphs=True,
                                 microbatches=microbatches) as c:
            assert c.runner.graphs is not None
            return await c.generate(PROMPTS, 16)

    assert asyncio.run(run()) == reference_tokens(model_dir, PROMPTS, 16)


@pytest.mark.parametrize("expert_nodes", [0, 2], ids=["colocated", "disaggregated"])
@pytest.mark.parametrize("arch", ["mixtral_dir", "qwen3_dir"])
def test_steps_with_prompts_beside_decodes_replay_graphs_exact_against_transformers(request, arch, expert_nodes):
    """Three batch slots for six prompts and 16 tokens a step: prompts prefill in chunks beside sequences that
    decode, and later prompts join them. Colocated, every step replays a graph (segment graphs cover steps with
    prompts there); with prefill_graph_tokens=0 those steps run eagerly, as before. The tokens equal transformers'
    either way."""
    model_dir = request.getfixturevalue(arch)

    async def run(prefill_graph_tokens):
        async with InprocCluster(model_dir, num_expert_nodes=expert_nodes, device="cuda", cuda_graphs=True,
                                 max_num_seqs=3, max_batch_tokens=16, prefill_graph_tokens=prefill_graph_tokens) as c:
            tokens = await c.generate(PROMPTS, 16)
            return tokens, c.runner.eager_steps

    expected = reference_tokens(model_dir, PROMPTS, 16)
    (graphed, eager_steps), (eager, eager_steps_off) = asyncio.run(run(512)), asyncio.run(run(0))
    assert graphed == eager == expected
    assert eager_steps_off >= 4  # the steps that carried prompts
    if expert_nodes == 0:
        assert eager_steps == 0


async def _decode_logits(cluster, prompts, steps, check_syncs):
    """Greedy steps over prompts; the logits of every decode step (all sequences decoding). check_syncs: no decode
    step may wait on the device; "all": no step at all (steps with prompts replaying their graphs too)."""
    sched, runner = cluster.scheduler, cluster.runner
    seqs = [Sequence(f"s{i}", p, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True), 0)
            for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    collected = []
    for step in range(steps + 1):
        batch = sched.schedule()
        decode = all(s.num_tokens - s.num_cached == 1 for s in batch)
        if check_syncs == "all" or (check_syncs and decode):
            torch.cuda.set_sync_debug_mode("error")  # any host wait inside the step raises
        try:
            logits = await runner.forward(step, batch, cluster.microbatches)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if decode:
            collected.append(logits.float().cpu())
        for seq, token in zip(batch, logits.argmax(-1).tolist()):
            sched.advance(seq, token)
    return collected


@pytest.mark.parametrize("microbatches", [1, 2])
def test_colocated_decode_steps_never_wait_on_the_device_and_graphs_equal_eager(mixtral_dir, microbatches):
    async def run(graphs):
        async with InprocCluster(mixtral_dir, num_expert_nodes=0, device="cuda", cuda_graphs=graphs,
                                 microbatches=microbatches) as cluster:
            return await _decode_logits(cluster, PROMPTS, 8, check_syncs="all" if graphs else True)

    graphed, eager = asyncio.run(run(True)), asyncio.run(run(False))
    assert len(graphed) == len(eager) == 8
    for g, e in zip(graphed, eager):
        assert torch.equal(g.argmax(-1), e.argmax(-1))
        assert (g - e).abs().max().item() < 1e-3


def test_bf16_kernels_agree_with_the_reference_ops_under_teacher_forcing(monkeypatch):
    """The shipped model in bf16, 64 prompts x 64 forced tokens of a frozen text: next-token argmax of the Triton
    path against the plain-torch ops on the same GPU (issue 9's bar: >= 99%, set over 16 prompts; 0.9932 over these
    64 and 0.9922 over their first 16 on an H200, benchmarks/bf16_agreement_gpu.py)."""
    model_dir = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"
    prompts, forced = teacher_forcing_case(model_dir)

    def argmaxes():
        return asyncio.run(teacher_forced_argmaxes(model_dir, prompts, forced, "cuda", torch.bfloat16))

    kernels = argmaxes()
    ops = kernel_ops()
    alone = {}  # each op's reference in place of its kernel, the other kernels kept: where the disagreement arises
    for module, name, op in ops:
        with monkeypatch.context() as one:
            one.setattr(module, name, functools.partial(op, backend="reference"))
            alone[f"{module.__name__.rsplit('.', 1)[-1]}.{name}"] = argmaxes()
    for module, name, op in ops:
        monkeypatch.setattr(module, name, functools.partial(op, backend="reference"))
    reference = argmaxes()
    for op, swapped in alone.items():
        print(f"  {op} as its reference, the rest kernels: agreement with the kernels "
              f"{(swapped == kernels).float().mean().item():.4f}, with the reference ops "
              f"{(swapped == reference).float().mean().item():.4f}")
    float32 = asyncio.run(teacher_forced_argmaxes(model_dir, prompts, forced, "cuda", torch.float32))
    agreement = (kernels == reference).float().mean().item()
    print(f"bf16 next-token argmax agreement, kernels vs reference ops: {agreement:.4f}; against float32 "
          f"(reference ops): kernels {(kernels == float32).float().mean().item():.4f}, "
          f"reference {(reference == float32).float().mean().item():.4f}")
    assert agreement >= 0.99
