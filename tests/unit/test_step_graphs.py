"""CUDA graphs of steps that carry prompt tokens, on the CPU: which steps replay which graph (both sides of the
lockstep M2N agreeing on the shape), and that a step padded to its graph's shape computes what the step itself
does. The captures and replays themselves run in tests/gpu (test_decode_step_gpu.py, test_lockstep_gpu.py)."""
import asyncio
import random
from types import SimpleNamespace

import pytest
import torch

from expertmesh.attention_node import prompt_logprobs
from expertmesh.attention_node.cuda_graphs import PREFILL, GraphSet, StepGraphs, new_tokens
from expertmesh.attention_node.model_runner import split_microbatches
from expertmesh.attention_node.scheduler import Scheduler, Sequence
from expertmesh.cuda_graph import prefill_bucket, step_graph_shapes
from expertmesh.kv.block_manager import BlockManager
from expertmesh.transport.protocol import SamplingParams
from tests.inproc_cluster import InprocCluster


def test_prefill_buckets_pad_by_at_most_half_and_stop_at_the_limit():
    assert prefill_bucket(2, 512) == 2 and prefill_bucket(100, 512) == 128 and prefill_bucket(130, 512) == 192
    assert prefill_bucket(512, 512) == 512 and prefill_bucket(513, 512) is None
    assert prefill_bucket(5, 0) is None  # prefill graphs off


@pytest.mark.parametrize("microbatches", [1, 2, 3])
def test_every_step_the_scheduler_makes_has_one_shape_on_both_sides_of_the_rounds(microbatches):
    """Steps of a scheduler with chunked prefill, some prompts asking for prompt logprobs: each step either replays a
    whole-step graph whose shape the expert node captured too (step_graph_shapes) and whose buffers fit each
    microbatch, or has a reason to run eagerly."""
    max_num_seqs, budget, limit = 8, 96, 64
    runner = SimpleNamespace(context_len=512, kv_cache=SimpleNamespace(block_size=16))
    graphs = StepGraphs(runner, max_num_seqs, microbatches, limit)
    graphs.graphs = {key: None for key in graphs.keys}  # captured: every key (no device here)
    expert_shapes = set(step_graph_shapes(max_num_seqs, microbatches, limit))
    sched = Scheduler(BlockManager(512, 16), max_num_seqs, budget, 512, eos_token_ids=())
    rng = random.Random(0)
    for i in range(40):
        sched.add(Sequence(f"r{i}", [1] * rng.choice([1, 3, 17, 40, 70, 150]),
                           SamplingParams(max_tokens=rng.randint(1, 12), ignore_eos=True), 0,
                           prompt_logprobs_n=1 if i % 9 == 4 else None))
    kinds = {"decode": 0, "prefill": 0, "eager": 0}
    while sched.running or sched.waiting:
        batch = sched.schedule()
        groups = split_microbatches(batch, microbatches)
        key = graphs.ready_for(batch, groups)
        tokens = sum(new_tokens(s) for s in batch)
        assert tokens == sum(len(s.new_token_ids()) for s in batch)
        logprobs = any(s.prompt_logprobs_n is not None and prompt_logprobs.positions(s) for s in batch)
        if key is None:
            kinds["eager"] += 1
            assert logprobs or max(sum(new_tokens(s) for s in g) for g in groups) > limit
        else:
            assert not logprobs  # graphs project each sequence's last row: no prompt rows
            kinds[key[0]] += 1
            assert key[1] in expert_shapes and len(key[1]) == len(groups)
            for group, size in zip(groups, key[1]):
                seqs_rows = size if key[0] != PREFILL else min(size, graphs.sizes[-1])
                assert len(group) <= seqs_rows and sum(new_tokens(s) for s in group) <= size
        for seq in batch:
            sched.advance(seq, 5)
    assert all(kinds.values()), kinds  # each kind of step occurred


def test_a_step_padded_to_its_graph_computes_what_the_step_does(qwen3_dir):
    """Colocated: a step of decodes and a prompt chunk, run as is and padded to a prefill graph's shape (16 sequence
    rows, 64 token rows): the same logits for every real sequence."""

    async def run():
        async with InprocCluster(qwen3_dir, num_expert_nodes=0, max_num_seqs=16, max_batch_tokens=40) as cluster:
            sched, runner = cluster.scheduler, cluster.runner
            for i, n in enumerate([5, 9, 3]):
                sched.add(Sequence(f"d{i}", list(range(10, 10 + n)), SamplingParams(max_tokens=8, ignore_eos=True), 0))
            for step in range(2):  # prefill, then one decode step
                batch = sched.schedule()
                logits = await runner.forward(step, batch, 1)
                for seq, token in zip(batch, logits.argmax(-1).tolist()):
                    sched.advance(seq, token)
            sched.add(Sequence("p", list(range(50, 110)), SamplingParams(max_tokens=2, ignore_eos=True), 0))
            batch = sched.schedule()  # 3 decodes and the first 37 of the prompt's 60 tokens
            assert [new_tokens(s) for s in batch] == [1, 1, 1, 37] and batch[-1].partial
            eager = await runner.forward(2, batch, 1)
            padded = GraphSet(runner, 16, 64, -(-runner.context_len // runner.kv_cache.block_size), prefill=True)
            padded.load(batch)
            assert padded.rows == 40 and padded.meta.max_query_len == 64
            logits = runner.segment(0, padded.token_ids, None, padded.meta, padded.last_token)[0]
            return eager, logits

    eager, logits = asyncio.run(run())
    assert logits.shape[0] == 16
    torch.testing.assert_close(logits[:4], eager, rtol=1e-5, atol=1e-5)


def test_a_padded_steps_padding_rows_go_to_no_expert(qwen3_dir):
    """Disaggregated: the rows a graph pads a step with carry expert id -1 to the expert nodes (no expert computes
    them); the real rows route as they do unpadded."""

    async def run():
        async with InprocCluster(qwen3_dir, num_expert_nodes=2, max_num_seqs=4) as cluster:
            runner = cluster.runner
            seqs = [Sequence("a", [3, 4, 5, 6, 7], SamplingParams(), 0), Sequence("b", [8, 9], SamplingParams(), 0)]
            for s in seqs:
                cluster.scheduler.blocks.allocate(s)
            token_ids, meta, last = runner.step_inputs(seqs)
            _, _, ids, _ = runner.segment(0, token_ids, None, meta, last)
            padded = GraphSet(runner, 4, 12, 16, prefill=True)
            padded.load(seqs)
            _, _, padded_ids, _ = runner.segment(0, padded.token_ids, None, padded.meta, padded.last_token)
            return ids, padded_ids

    ids, padded_ids = asyncio.run(run())
    assert padded_ids.shape[0] == 12 and torch.equal(padded_ids[:7], ids)
    assert (padded_ids[7:] == -1).all() and (ids >= 0).all()


@pytest.mark.parametrize("link, step_capture", [("steps", "works"), ("steps", "fails"), ("segments", None)])
def test_segment_graphs_are_captured_only_where_whole_steps_are_not(monkeypatch, link, step_capture):
    """Over a link that captures whole steps (ipc) every decode step replays one, so the segment graphs, 12-25 s of
    start-up at 256 sequences, are left out; they are captured where whole steps are not, or failed to capture."""
    from expertmesh.attention_node import model_runner
    captured = []

    class Fake:
        def __init__(self, runner, max_num_seqs, microbatches, prefill_tokens):
            self.kind = type(self).__name__

        def capture(self):
            if self.kind == "StepGraphs" and step_capture == "fails":
                raise RuntimeError("operation not permitted when stream is capturing")
            captured.append(self.kind)

    monkeypatch.setattr(model_runner, "StepGraphs", type("StepGraphs", (Fake,), {}))
    monkeypatch.setattr(model_runner, "SegmentGraphs", type("SegmentGraphs", (Fake,), {}))
    runner = SimpleNamespace(spec=SimpleNamespace(mla=None), experts=SimpleNamespace(captures_steps=link == "steps"),
                             local_experts=None, graphs=None, step_graphs=None)
    model_runner.ModelRunner.capture_graphs(runner, 8, 2, 64)
    assert captured == {"works": ["StepGraphs"], "fails": ["SegmentGraphs"], None: ["SegmentGraphs"]}[step_capture]
    assert (runner.step_graphs is not None) == (step_capture == "works")
    assert (runner.graphs is not None) == (step_capture != "works")
