"""Prompt logprobs at the attention node (attention_node/prompt_logprobs.py) against a full forward of transformers
on the same checkpoint, float32: in one prefill step beside sequences that do not ask, across a prefill fed in
chunks, after a preemption (recomputation scores nothing twice), over expert nodes and colocated."""
import asyncio

import pytest
import torch

from expertmesh.attention_node import prompt_logprobs
from expertmesh.attention_node.sampler import sample_step
from expertmesh.attention_node.scheduler import Sequence
from expertmesh.transport.protocol import SamplingParams
from tests.inproc_cluster import InprocCluster

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 300, 2], [100, 200, 300], [42] * 12, [7]]
TOP = 3


def reference_logits(model_dir, prompt: list[int]) -> torch.Tensor:
    """transformers' logits at every position of prompt, float32."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def expected_entries(model_dir, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob of each prompt token after the first, its rank, the top-TOP logprobs at each position) from
    transformers' logits over the whole prompt."""
    logprobs = torch.log_softmax(reference_logits(model_dir, prompt)[:-1], -1)
    target = logprobs.gather(1, torch.tensor(prompt[1:])[:, None])
    return target[:, 0], (logprobs > target).sum(-1) + 1, logprobs.topk(TOP, -1)


def assert_equal_to_transformers(model_dir, prompt: list[int], entries: list) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    target, rank, top = expected_entries(model_dir, prompt)
    got = torch.tensor([e[0] for e in entries[1:]])
    assert (got - target).abs().max().item() < 1e-4 if len(prompt) > 1 else got.numel() == 0
    assert [e[1] for e in entries[1:]] == rank.tolist()
    for e, ids, values in zip(entries[1:], top.indices.tolist(), top.values.tolist()):
        assert [t for t, _ in e[2]] == ids
        assert max(abs(lp - v) for (_, lp), v in zip(e[2], values)) < 1e-4


def asking(i: int, prompt: list[int]) -> Sequence:
    return Sequence(f"r{i}", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), 0,
               prompt_logprobs_n=TOP)


@pytest.mark.parametrize("expert_nodes, microbatches", [(2, 2), (0, 1)], ids=["disaggregated", "colocated"])
def test_prompt_logprobs_equal_transformers_in_a_mixed_step(mixtral_dir, expert_nodes, microbatches):
    """Every prompt in one step, the odd ones not asking; the runner still returns each sequence's last row, in
    order, to sample from."""
    async def run():
        async with InprocCluster(mixtral_dir, num_expert_nodes=expert_nodes, microbatches=microbatches) as cluster:
            seqs = [asking(i, p) if i % 2 == 0 else Sequence(f"r{i}", p, SamplingParams(max_tokens=1), 0)
                    for i, p in enumerate(PROMPTS)]
            for s in seqs:
                cluster.scheduler.add(s)
            batch = cluster.scheduler.schedule()
            return seqs, await cluster.runner.forward(1, batch, cluster.microbatches)

    seqs, logits = asyncio.run(run())
    assert logits.shape[0] == len(PROMPTS)
    for i, seq in enumerate(seqs):
        assert (logits[i] - reference_logits(mixtral_dir, seq.prompt_ids)[-1]).abs().max().item() < 1e-4
        if i % 2 == 0:
            assert_equal_to_transformers(mixtral_dir, seq.prompt_ids, prompt_logprobs.finished(seq))
        else:
            assert prompt_logprobs.finished(seq) is None and seq.prompt_logprobs == [None]


def test_prompt_logprobs_gather_across_chunks_and_survive_preemption(qwen3_dir):
    """A budget of 4 tokens a step: the 12-token prompt prefills in 3 chunks, the 9-token one in chunks of 3 beside
    the first one's decode, and again (prompt and first output, 10 tokens) after its preemption."""
    async def run():
        async with InprocCluster(qwen3_dir, num_expert_nodes=2, max_batch_tokens=4, max_num_seqs=4) as cluster:
            sched, runner, steps = cluster.scheduler, cluster.runner, []

            async def until_sampled(seq: Sequence) -> list | None:
                """Steps until seq samples a token; what its first output would carry."""
                while True:
                    batch = sched.schedule()
                    steps.append(seq.num_new)
                    logits = await runner.forward(len(steps), batch, 1)
                    done = seq in batch and seq.samples
                    entries = prompt_logprobs.finished(seq) if done else None
                    for s, token in zip(batch, sample_step(logits, batch)[0]):
                        sched.advance(s, token)
                    if done:
                        return None if entries is None else list(entries)

            chunked, preempted = asking(0, PROMPTS[2]), asking(1, PROMPTS[0])
            sched.add(chunked)
            entries = await until_sampled(chunked)
            assert steps == [4, 4, 4]
            sched.add(preempted)
            first = await until_sampled(preempted)
            assert steps[3:] == [3, 3, 3]
            sched._preempt(preempted)  # recomputation: prompt and first output fed again, in chunks
            assert await until_sampled(preempted) is None  # its prompt's entries went with its first token
            assert steps[6:] == [4, 4, 2]  # the first has finished (max_tokens 4): the whole budget is its
            return entries, first, preempted

    chunked_entries, first, preempted = asyncio.run(run())
    assert_equal_to_transformers(qwen3_dir, PROMPTS[2], chunked_entries)
    assert_equal_to_transformers(qwen3_dir, PROMPTS[0], first)
    assert preempted.prompt_logprobs == first  # nothing appended by the recomputation
