"""The paged KV cache: block bookkeeping, per-step tables checked by hand, sizing, and the scheduler's admission
by free blocks and preemption by recomputation (driven by a fake model that reads its context through the
block tables, so a wrong table or a stale block changes the tokens)."""
import argparse
import asyncio
import random
import zlib

import numpy as np
import pytest
import torch

from expertmesh.attention_node.scheduler import Scheduler, Sequence
from expertmesh.config import Config, ConfigError, EngineConfig
from expertmesh.kv.block_manager import BlockManager
from expertmesh.kv.cache import CUDA_ACTIVATION_MARGIN, KVCacheTooSmall, PagedKVCache, bytes_per_block, num_blocks_for
from expertmesh.kv.metadata import build_step_metadata
from expertmesh.model.spec import ModelSpec
from expertmesh.transport.protocol import SamplingParams


class Tokens:
    """A stand-in sequence for the block manager."""

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.block_ids: list[int] = []
        self.block_row = -1


def seq(rid, prompt_len, max_tokens=4, first=0):
    return Sequence(rid, list(range(first, first + prompt_len)),
                    SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), 0)


def assert_partition(manager: BlockManager, owners) -> None:
    """Every block is either free or owned by exactly one sequence."""
    owned = [b for owner in owners for b in owner.block_ids]
    assert len(owned) == len(set(owned)), f"a block is owned twice: {sorted(owned)}"
    assert sorted(owned + list(manager._free)) == list(range(manager.num_blocks))


# block manager

def test_block_boundaries_allocate_and_append():
    manager = BlockManager(num_blocks=5, block_size=4)
    s = Tokens(4)
    assert manager.can_allocate(4) and manager.can_allocate(20) and not manager.can_allocate(21)
    assert not manager.can_allocate(17, reserve=1)
    manager.allocate(s)
    assert (s.block_ids, manager.num_free_blocks, manager.usage) == ([0], 4, 0.2)
    for num_tokens, needs in [(5, 1), (6, 0), (8, 0), (9, 1)]:  # a new block exactly when a token starts one
        s.num_tokens = num_tokens
        assert manager.blocks_to_append(s) == needs
        manager.append(s)
        assert len(s.block_ids) == manager.blocks_for(num_tokens)
    assert (s.block_ids, manager.num_free_blocks) == ([0, 1, 2], 2)
    with pytest.raises(ValueError, match="already owns"):
        manager.allocate(s)
    manager.free(s)
    assert (s.block_ids, manager.num_free_blocks, manager.usage) == ([], 5, 0.0)


def test_block_manager_never_gives_a_block_twice_and_gets_all_back():
    rng = random.Random(0)
    manager = BlockManager(num_blocks=24, block_size=8)
    live: list[Tokens] = []
    for _ in range(400):
        action = rng.random()
        if action < 0.3:
            s = Tokens(rng.randint(1, 40))
            if manager.can_allocate(s.num_tokens):
                manager.allocate(s)
                live.append(s)
        elif action < 0.8 and live:
            s = rng.choice(live)
            s.num_tokens += 1
            if manager.can_append(s):
                manager.append(s)
            else:
                with pytest.raises(RuntimeError):
                    manager.append(s)
                manager.free(s)
                live.remove(s)
        elif live:
            s = live.pop(rng.randrange(len(live)))
            manager.free(s)
        assert_partition(manager, live)
        assert all(len(s.block_ids) == manager.blocks_for(s.num_tokens) for s in live)
        # each live sequence's blocks mirrored in a row of its own, zeros after them (a step's table is a gather)
        assert len({s.block_row for s in live}) == len(live)
        for s in live:
            row = manager.tables[s.block_row]
            assert row[:len(s.block_ids)].tolist() == s.block_ids and not row[len(s.block_ids):].any()
    for s in live:
        manager.free(s)
    assert manager.num_free_blocks == 24 and manager.num_used_blocks == 0
    assert not manager.tables.any() and {s.block_row for s in live} <= {-1}


def test_step_metadata_from_the_mirrored_tables_equals_the_one_from_the_lists():
    manager = BlockManager(num_blocks=2000, block_size=4)
    rng = random.Random(1)
    live = [Tokens(rng.randint(1, 60)) for _ in range(40)]
    for s in live:
        manager.allocate(s)
    for s in live[::3]:  # rows freed and taken again, tables grown by appends
        manager.free(s)
        s.num_tokens += 50
        manager.allocate(s)
    assert manager.tables.shape >= (40, 28)  # grown from 16 x 16 on the way
    steps = [(s.block_ids, s.num_tokens - 1, 1) for s in live[5:30]]
    rows = [s.block_row for s in live[5:30]]
    for pad_to, width in [(None, None), ((32, 32), 40)]:
        by_list = build_step_metadata(steps, 4, "cpu", pad_to, width)
        mirrored = build_step_metadata(steps, 4, "cpu", pad_to, width, mirror=(manager.tables, rows))
        for name in ("block_table", "slot_mapping", "seq_lens", "query_start", "positions"):
            assert torch.equal(getattr(by_list, name), getattr(mirrored, name)), name


# step metadata

def test_step_metadata_by_hand_with_padding():
    # block size 4. A: 5 tokens cached in blocks [5, 2], feeds 1 (position 5 -> block 2, offset 1 -> slot 9).
    # B: a prefill of 9 tokens into blocks [0, 7, 3]: slots 0..3, 28..31, 12.
    meta = build_step_metadata([([5, 2], 5, 1), ([0, 7, 3], 0, 9)], block_size=4, device="cpu", pad_to=(4, 16))
    assert meta.block_table.dtype == torch.int32 and meta.block_table.tolist() == \
        [[5, 2, 0], [0, 7, 3], [0, 0, 0], [0, 0, 0]]
    assert meta.slot_mapping.dtype == torch.int64 and meta.slot_mapping.tolist() == \
        [9, 0, 1, 2, 3, 28, 29, 30, 31, 12] + [-1] * 6
    assert meta.positions.dtype == torch.int64 and meta.positions.tolist() == [5] + list(range(9)) + [0] * 6
    assert meta.seq_lens.dtype == torch.int32 and meta.seq_lens.tolist() == [6, 9, 0, 0]
    assert meta.query_start.dtype == torch.int32 and meta.query_start.tolist() == [0, 1, 10, 10, 10]
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs, meta.num_tokens) == (9, 9, 2, 10)


def test_step_metadata_unpadded_fixed_width_and_errors():
    meta = build_step_metadata([([3], 2, 1)], block_size=8, device="cpu", block_table_width=4)
    assert meta.block_table.tolist() == [[3, 0, 0, 0]]
    assert (meta.slot_mapping.tolist(), meta.positions.tolist(), meta.seq_lens.tolist(),
            meta.query_start.tolist()) == ([26], [2], [3], [0, 1])
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs, meta.num_tokens) == (1, 3, 1, 1)
    empty = build_step_metadata([], block_size=8, device="cpu", pad_to=(2, 3))
    assert (empty.block_table.tolist(), empty.slot_mapping.tolist(), empty.query_start.tolist()) == \
        ([[0], [0]], [-1, -1, -1], [0, 0, 0])
    with pytest.raises(ValueError, match="smaller than the step's 1 sequences and 9 tokens"):
        build_step_metadata([([0, 1], 0, 9)], block_size=8, device="cpu", pad_to=(1, 8))
    with pytest.raises(ValueError, match="narrower"):
        build_step_metadata([([0, 1], 0, 9)], block_size=8, device="cpu", block_table_width=1)
    with pytest.raises(ValueError, match="1 blocks of 8 cannot hold its 9 tokens"):
        build_step_metadata([([0], 8, 1)], block_size=8, device="cpu")


def test_paged_cache_shapes_and_its_metadata(mixtral_dir):
    spec = ModelSpec.from_dir(mixtral_dir)
    cache = PagedKVCache(spec, num_blocks=6, block_size=8, dtype=torch.float32, device="cpu")
    assert len(cache.k) == len(cache.v) == spec.num_layers
    assert cache.k[0].shape == (6, 8, spec.num_kv_heads, spec.head_dim) and not cache.v[-1].any()
    meta = cache.step_metadata([([4, 1], 9, 1)])
    assert meta.slot_mapping.tolist() == [1 * 8 + 1] and meta.block_table.tolist() == [[4, 1]]


def test_mla_cache_holds_one_latent_and_rope_key_per_token_and_layer():
    from expertmesh.model.shapes import shape
    _, spec = shape("deepseek_v3")  # 61 layers of 512 latent + 64 rope values a token
    assert bytes_per_block(spec, 16, torch.bfloat16) == 61 * 16 * 576 * 2
    _, tiny = shape("tiny_mla")
    cache = PagedKVCache(tiny, num_blocks=3, block_size=8, dtype=torch.float32, device="cpu")
    assert cache.v == [] and [c.shape for c in cache.layer(1)] == [(3, 8, 1, 64 + 16)]


# sizing

def test_sizing_explicit_cpu_default_and_too_small(mixtral_dir, monkeypatch):
    spec = ModelSpec.from_dir(mixtral_dir)
    assert bytes_per_block(spec, 16, torch.bfloat16) == 2 * spec.num_layers * 16 * spec.num_kv_heads * spec.head_dim * 2
    engine = EngineConfig(max_num_seqs=3, max_model_len=100, block_size=16)
    assert num_blocks_for(engine, spec, torch.float32, "cpu") == 3 * 7  # ceil(100 / 16) blocks per sequence
    assert num_blocks_for(EngineConfig(max_model_len=100, num_kv_blocks=9), spec, torch.float32, "cpu") == 9
    with pytest.raises(KVCacheTooSmall, match="6 blocks .*full context of 100 tokens, which needs 7 blocks"):
        num_blocks_for(EngineConfig(max_model_len=100, num_kv_blocks=6), spec, torch.float32, "cpu")

    # the CUDA convention with a fake device: 100 GiB total, 10 GiB reserved by torch (weights), 85 GiB free
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (85 * gib, 100 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * gib)
    per_block = bytes_per_block(spec, 16, torch.bfloat16)
    roomy = EngineConfig(max_num_seqs=10**9, max_model_len=100, gpu_memory_utilization=0.9)
    expected = int((0.9 * (100 * gib) - 10 * gib - CUDA_ACTIVATION_MARGIN * (100 * gib)) // per_block)
    assert num_blocks_for(roomy, spec, torch.bfloat16, "cuda") == expected
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * gib, 100 * gib))  # another process
    expected = int((40 * gib - CUDA_ACTIVATION_MARGIN * (100 * gib)) // per_block)
    assert num_blocks_for(roomy, spec, torch.bfloat16, "cuda") == expected
    capped = EngineConfig(max_num_seqs=2, max_model_len=100)  # no more than 2 full-length sequences can use
    assert num_blocks_for(capped, spec, torch.bfloat16, "cuda") == 2 * 7
    with pytest.raises(KVCacheTooSmall, match="gpu_memory_utilization=0.1"):
        num_blocks_for(EngineConfig(max_model_len=100, gpu_memory_utilization=0.1), spec, torch.bfloat16, "cuda")


def test_engine_config_validation_and_flags():
    for engine, message in [({"block_size": 12}, "block_size=12"), ({"block_size": 512}, "block_size=512"),
                            ({"block_size": 4}, "block_size=4"), ({"gpu_memory_utilization": 0.0}, "utilization=0.0"),
                            ({"gpu_memory_utilization": 1.5}, "utilization=1.5"), ({"num_kv_blocks": 0}, "blocks=0"),
                            ({"max_waiting_steps": -1}, "max_waiting_steps=-1"),
                            ({"max_batch_tokens": 16, "max_num_seqs": 32}, "max_batch_tokens=16 < ")]:
        with pytest.raises(ConfigError, match=message):
            Config.from_dict({"engine": engine})
    assert Config.from_dict({"engine": {"block_size": 256, "gpu_memory_utilization": 1.0}}).engine.block_size == 256

    from expertmesh.cli import _launch_parser, config_from_args
    parser = argparse.ArgumentParser()
    _launch_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["launch", "--block-size", "32", "--gpu-memory-utilization", "0.5",
                              "--num-kv-blocks", "100", "--enforce-eager", "--max-batch-tokens", "512",
                              "--max-waiting-steps", "3"])
    engine = config_from_args(args).engine
    assert (engine.block_size, engine.gpu_memory_utilization, engine.num_kv_blocks, engine.enforce_eager,
            engine.max_batch_tokens, engine.max_waiting_steps) == (32, 0.5, 100, True, 512, 3)
    engine = config_from_args(parser.parse_args(["launch"])).engine
    assert (engine.block_size, engine.gpu_memory_utilization, engine.num_kv_blocks, engine.enforce_eager,
            engine.max_batch_tokens, engine.max_waiting_steps) == (16, 0.9, None, False, 2048, 0)


# scheduler

def make_scheduler(num_blocks, block_size=4, max_num_seqs=8, budget=1000, context_len=64, watermark=0.0):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, context_len, (1,), watermark)


def test_admission_is_limited_by_free_blocks_and_the_watermark():
    sched = make_scheduler(num_blocks=6)
    a, b, c = seq("a", 9), seq("b", 9), seq("c", 1)  # 3, 3 and 1 blocks of 4
    for s in (a, b, c):
        sched.add(s)
    assert sched.schedule() == [a, b]
    assert sched.waiting[0] is c and sched.blocks.num_free_blocks == 0
    sched.release(a)
    assert sched.schedule() == [b, c] and a.block_ids == []

    sched = make_scheduler(num_blocks=100, context_len=512, watermark=0.05)  # 5 blocks kept free beside running
    big, small = seq("big", 4 * 96), seq("small", 4)
    sched.add(big)
    sched.add(small)
    assert sched.schedule() == [big]  # alone, the watermark does not hold it back
    assert sched.waiting[0] is small  # 4 free blocks: 1 for small would leave 3 < 5


def test_preemption_frees_the_newest_and_requeues_it_first():
    sched = make_scheduler(num_blocks=4)
    a, b, d = seq("a", 7, max_tokens=3), seq("b", 7, max_tokens=3, first=50), seq("d", 2)
    sched.add(a)
    sched.add(b)
    assert sched.schedule() == [a, b]  # 2 blocks each: all 4 used
    sched.add(d)
    for s in (a, b):
        sched.advance(s, 100)
    assert sched.schedule() == [a, b]  # token 8 still fits in the second block
    for s in (a, b):
        sched.advance(s, 101)
    b_blocks = list(b.block_ids)
    assert sched.schedule() == [a]  # a's 9th token needs a block: b, the newest, gives its two
    assert (sched.num_preemptions, list(sched.waiting), b.block_ids, b.num_cached) == (1, [b, d], [], 0)
    assert set(b_blocks) & set(a.block_ids) and sched.blocks.num_free_blocks == 1
    assert b.output_ids == [100, 101] and b.new_token_ids() == list(range(50, 57)) + [100, 101]
    assert_partition(sched.blocks, [a, b, d])
    assert sched.advance(a, 102) == "length" and sched.blocks.num_free_blocks == 4
    assert sched.schedule() == [b, d]  # b readmitted first, re-feeding prompt + outputs as one prefill
    assert len(b.block_ids) == 3 and len(d.block_ids) == 1
    assert sched.advance(b, 102) == "length" and b.output_ids == [100, 101, 102]


def test_sequences_that_start_a_block_in_one_step_get_them_in_running_order_the_others_untouched():
    """With room for all, only the sequences whose next token starts a block get one, oldest first (the step's
    fast path: no call for the rest); the rest keep their tables, and nothing is preempted."""
    sched = make_scheduler(num_blocks=12)
    seqs = [seq(name, n) for name, n in (("a", 4), ("b", 7), ("c", 4), ("d", 5))]  # blocks of 4: a, c full
    for s in seqs:
        sched.add(s)
    assert sched.schedule() == seqs
    before = {s.request_id: list(s.block_ids) for s in seqs}
    free = list(sched.blocks._free)
    for s in seqs:
        sched.advance(s, 9)  # a and c: 5 tokens, a second block each; b: 8, d: 6 still fit
    assert sched.schedule() == seqs and sched.num_preemptions == 0
    assert [s.block_ids[len(before[s.request_id]):] for s in seqs] == [[free[0]], [], [free[1]], []]
    assert_partition(sched.blocks, seqs)


def test_the_newest_sequence_preempts_itself_when_it_alone_needs_a_block():
    sched = make_scheduler(num_blocks=3)
    a, b = seq("a", 6, max_tokens=5), seq("b", 4, max_tokens=5)  # 2 blocks + 1 block
    sched.add(a)
    sched.add(b)
    assert sched.schedule() == [a, b]
    sched.advance(a, 9)  # a: 7 tokens, still 2 blocks
    sched.advance(b, 9)  # b: 5 tokens, needs a second block and none is free
    assert sched.schedule() == [a]
    assert list(sched.waiting) == [b] and b.block_ids == [] and sched.num_preemptions == 1


def test_a_request_that_can_never_fit_is_refused_with_its_numbers():
    sched = make_scheduler(num_blocks=4, block_size=4, context_len=64)
    with pytest.raises(ValueError, match="60 prompt tokens \\+ max_tokens 5 exceed the context of 64"):
        sched.add(seq("long", 60, max_tokens=5))
    # 14 + 4 - 1 = 17 tokens at most in the cache: 5 blocks of 4, and the cache has 4
    with pytest.raises(ValueError, match="14 prompt tokens \\+ max_tokens 4 need 5 KV-cache blocks of 4 tokens; "
                                         "the cache has 4"):
        sched.add(seq("wide", 14, max_tokens=4))
    sched.add(seq("fits", 13, max_tokens=4))  # 16 tokens: exactly 4 blocks
    assert not sched.waiting[0].block_ids


def fake_next_token(context: list[int]) -> int:
    return zlib.crc32(np.asarray(context, dtype=np.int64).tobytes()) % 1000


def run_fake_engine(prompts, max_tokens, num_blocks, block_size=4, max_num_seqs=4, budget=64):
    """Drives schedule/advance like the attention node. The fake model writes each step's tokens into a token
    cache through slot_mapping and reads every sequence's context back through block_table/seq_lens; its next
    token hashes that context, so a block shared twice, a stale block or a wrong table changes the outputs."""
    sched = make_scheduler(num_blocks, block_size, max_num_seqs, budget, context_len=128)
    seqs = [Sequence(f"r{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), 0)
            for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    token_cache = np.full(num_blocks * block_size, -1, dtype=np.int64)
    sent = {s.request_id: [] for s in seqs}
    steps = 0
    while sched.running or sched.waiting:
        batch = sched.schedule()
        assert batch and len(batch) <= max_num_seqs
        assert_partition(sched.blocks, seqs)
        fed = [s.new_token_ids() for s in batch]
        assert [len(f) for f in fed] == [s.num_new for s in batch] and sum(map(len, fed)) <= budget
        meta = build_step_metadata([(s.block_ids, s.num_cached, len(f)) for s, f in zip(batch, fed)], block_size,
                                   "cpu", pad_to=(max_num_seqs, budget))
        token_cache[meta.slot_mapping[:meta.num_tokens].numpy()] = np.concatenate(fed)
        for i, s in enumerate(batch):
            seq_len = int(meta.seq_lens[i])
            positions = np.arange(seq_len)
            context = token_cache[meta.block_table[i].numpy()[positions // block_size] * block_size
                                  + positions % block_size]
            # what the kernel reads is the sequence, up to the end of its chunk
            assert context.tolist() == (s.prompt_ids + s.output_ids)[:seq_len]
            token = fake_next_token(context.tolist())
            if s.samples:  # a chunk inside the prompt streams nothing
                sent[s.request_id].append(token)  # one token per sequence and step, as streamed to the client
            sched.advance(s, token)
        steps += 1
        assert steps < 1000
    assert sched.blocks.num_free_blocks == num_blocks
    return [s.output_ids for s in seqs], sent, sched.num_preemptions


def test_tiny_cache_finishes_every_sequence_through_preemptions():
    prompts = [list(range(10 * i + 1, 10 * i + 1 + n)) for i, n in enumerate([5, 9, 3, 7])]
    roomy_outputs, _, roomy_preemptions = run_fake_engine(prompts, max_tokens=12, num_blocks=64)
    outputs, sent, preemptions = run_fake_engine(prompts, max_tokens=12, num_blocks=6)  # 9 + 11 = 20 tokens: 5
    assert roomy_preemptions == 0 and preemptions > 0
    assert outputs == roomy_outputs  # recomputation changes nothing
    for output, tokens in zip(outputs, sent.values()):
        assert len(output) == 12 and tokens == output  # every token sent once, none produced again
    # a single-step reference: each output follows from its prompt and the outputs before it
    for prompt, output in zip(prompts, outputs):
        assert all(fake_next_token(prompt + output[:k]) == output[k] for k in range(12))


def test_chunked_prefill_through_preemptions_gives_the_same_tokens():
    """A budget of 4 tokens a step: every prompt but one prefills in chunks, beside decodes and through preemptions
    (each readmission re-feeds prompt and outputs in chunks too); the outputs are a single-step reference's."""
    prompts = [list(range(10 * i + 1, 10 * i + 1 + n)) for i, n in enumerate([5, 9, 3, 7])]
    roomy_outputs, _, _ = run_fake_engine(prompts, max_tokens=12, num_blocks=64)
    outputs, sent, preemptions = run_fake_engine(prompts, max_tokens=12, num_blocks=6, budget=4)
    assert preemptions > 0 and outputs == roomy_outputs
    assert all(tokens == output for output, tokens in zip(outputs, sent.values()))


def test_abort_of_a_preempted_sequence_removes_it_from_the_queue():
    sched = make_scheduler(num_blocks=3)
    a, b = seq("a", 6, max_tokens=5), seq("b", 4, max_tokens=5)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.advance(a, 9)
    sched.advance(b, 9)
    sched.schedule()  # b preempted
    assert sched.abort("b") is b and b not in sched.waiting and b not in sched.running


def test_tiny_cache_generation_matches_a_roomy_one(mixtral_dir):
    """The real runner through preemptions: the same greedy tokens as with room for everything.
    Needs the paged model runner (attention_node/model_runner.py reading StepMetadata)."""
    from tests.inproc_cluster import InprocCluster
    prompts = [[5, 6, 7, 8, 9, 10], [100, 200, 300], [42] * 12, [7]]

    async def run(**cache):
        async with InprocCluster(mixtral_dir, max_len=32, block_size=8, **cache) as cluster:
            return await cluster.generate(prompts, 12), cluster.scheduler.num_preemptions

    roomy, no_preemptions = asyncio.run(run())
    tiny, preemptions = asyncio.run(run(num_blocks=4))  # one sequence of the full 32 tokens
    assert no_preemptions == 0 and preemptions > 0
    assert tiny == roomy
    # chunked prefill: 5 tokens a step, so the 6- and 12-token prompts (and readmissions) take several steps
    chunked, _ = asyncio.run(run(max_batch_tokens=5, num_blocks=4, max_num_seqs=4))
    assert chunked == roomy


def test_to_device_all_on_the_cpu_is_the_host_tensors():
    import numpy as np
    from expertmesh.host_copy import to_device_all
    table = np.arange(6, dtype=np.int32).reshape(2, 3)
    got_table, got_ids = to_device_all([table, [4, 5]], "cpu")
    assert got_table.dtype == torch.int32 and got_table.tolist() == table.tolist()
    assert got_ids.dtype == torch.int64 and got_ids.tolist() == [4, 5]


def test_copy_into_refills_a_buffer_of_to_device_buffer_in_place_and_refuses_another_layout():
    import numpy as np
    from expertmesh.host_copy import copy_into, to_device_buffer
    buffer, (table, ids) = to_device_buffer([np.zeros((2, 3), dtype=np.int32), [0, 0, 0]], "cpu")
    copy_into([np.arange(6, dtype=np.int32).reshape(2, 3), [7, 8, 9]], buffer)
    assert table.tolist() == [[0, 1, 2], [3, 4, 5]] and ids.tolist() == [7, 8, 9]  # the same views, refilled
    with pytest.raises(ValueError, match="not laid out as the"):
        copy_into([np.zeros((2, 3), dtype=np.int32), [1, 2, 3, 4]], buffer)
