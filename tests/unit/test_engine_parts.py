"""Scheduler, sampler and microbatch split of the attention node (tests/unit/test_kv.py: blocks, preemption)."""
import pytest
import torch

from expertmesh.attention_node.model_runner import split_microbatches
from expertmesh.attention_node.sampler import sample_step
from expertmesh.attention_node.scheduler import Scheduler, Sequence
from expertmesh.kv.block_manager import BlockManager
from expertmesh.transport.protocol import SamplingParams


def seq(rid, prompt_len, max_tokens=4, **kw):
    return Sequence(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw), 0)


def make_scheduler(max_num_seqs=2, budget=10, max_len=32, num_blocks=64, block_size=8):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, max_len, eos_token_ids=(1,))


def test_admission_respects_max_num_seqs_and_token_budget():
    sched = make_scheduler()
    a, b, c = seq("a", 8), seq("b", 8), seq("c", 3)
    for s in (a, b, c):
        sched.add(s)
    assert sched.schedule() == [a, b]  # budget 10: a's 8 tokens, then a chunk of b's
    assert (a.num_new, b.num_new) == (8, 2) and a.samples and not b.samples
    assert sched.waiting[0] is c  # max_num_seqs=2 reached
    sched.advance(a, 5)
    assert sched.advance(b, 99) is None and b.output_ids == [] and b.num_cached == 2  # a chunk samples nothing
    assert sched.schedule() == [a, b] and (a.num_new, b.num_new) == (1, 6) and b.new_token_ids() == list(range(2, 8))
    sched.advance(a, 5)
    sched.advance(b, 6)
    assert b.output_ids == [6] and b.num_cached == 8
    sched.release(a)
    assert sched.schedule() == [b, c] and (b.num_new, c.num_new) == (1, 3)


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_beside_the_decodes():
    """Chunked prefill: no step feeds more than max_batch_tokens (the M2N buffers hold that many); decodes go first,
    the prompts being prefilled take what is left, oldest first, and a prompt samples its first token with its last
    chunk."""
    sched = make_scheduler(max_num_seqs=3, budget=8, max_len=64)
    a, b, c = seq("a", 2, max_tokens=20), seq("b", 19), seq("c", 5)
    for s in (a, b, c):
        sched.add(s)
    fed = []
    while sched.running or sched.waiting:
        step = sched.schedule()
        assert sum(len(s.new_token_ids()) for s in step) <= 8
        fed.append({s.request_id: s.num_new for s in step})
        for s in step:
            sched.advance(s, 3)
    # c waits for budget at step 2, then takes the 1 token left; b's last chunk (step 3) gives its first token
    assert fed[:5] == [{"a": 2, "b": 6}, {"a": 1, "b": 7}, {"a": 1, "b": 6, "c": 1}, {"a": 1, "b": 1, "c": 4},
                       {"a": 1, "b": 1, "c": 1}]
    assert len(b.output_ids) == 4 and len(c.output_ids) == 4 and len(a.output_ids) == 20


def test_advance_appends_the_token_and_frees_the_blocks_when_done():
    sched = make_scheduler(max_num_seqs=1, num_blocks=4, block_size=8)
    s = seq("a", 4, max_tokens=2)
    sched.add(s)
    assert sched.schedule() == [s]
    assert (s.block_ids, sched.blocks.num_free_blocks) == ([0], 3)
    assert sched.advance(s, 7) is None
    assert (s.num_cached, s.output_ids, s.new_token_ids(), sched.blocks.num_free_blocks) == (4, [7], [7], 3)
    assert sched.advance(s, 8) == "length"
    assert (s.num_cached, s.output_ids, s.block_ids, sched.blocks.num_free_blocks, sched.running) == \
        (5, [7, 8], [], 4, [])


def test_finish_reasons():
    sched = make_scheduler()
    s = seq("a", 4, max_tokens=3)
    s.output_ids = [1]
    assert sched.finish_reason(s) == "stop"
    s.sampling.ignore_eos = True
    assert sched.finish_reason(s) is None
    s.output_ids = [1, 2, 3]
    assert sched.finish_reason(s) == "length"
    s.aborted = True
    assert sched.finish_reason(s) == "abort"
    too_long = seq("b", 30, max_tokens=4)
    try:
        sched.add(too_long)
        raise AssertionError("a request over the context must be refused")
    except ValueError as exc:
        assert "exceed the context of 32" in str(exc)


def test_a_step_samples_each_sequence_with_its_own_seed_and_reports_logprobs():
    logits = torch.randn(3, 50)
    seqs = [Sequence("a", [1], SamplingParams(temperature=0.0), 0),
            Sequence("b", [1], SamplingParams(temperature=1.0, seed=7, logprobs=2), 7),
            Sequence("c", [1], SamplingParams(temperature=1.0), 7)]
    tokens, logprobs = sample_step(logits, seqs)
    assert tokens[0] == int(logits[0].argmax())
    again, _ = sample_step(logits[1:2], seqs[1:2])  # the same draw alone as in a batch
    assert again[0] == tokens[1]
    assert logprobs[0] is None and logprobs[2] is None
    assert abs(logprobs[1][0] - torch.log_softmax(logits[1], -1)[tokens[1]].item()) < 1e-5
    assert len(logprobs[1][1]) == 2


def test_microbatch_split_balances_tokens():
    seqs = [seq(str(i), n) for i, n in enumerate([10, 1, 1, 1, 10, 1])]
    groups = split_microbatches(seqs, 2)
    assert [s for g in groups for s in g] == seqs and len(groups) == 2
    assert split_microbatches(seqs[:1], 3) == [seqs[:1]]
    assert len(split_microbatches(seqs, 3)) == 3


def test_to_device_gives_int64_on_the_host_as_given():
    from expertmesh.host_copy import to_device
    got = to_device([3, 1, 2], "cpu")
    assert got.dtype == torch.long and got.tolist() == [3, 1, 2]
    rows = torch.tensor([5, 7])
    assert to_device(rows, torch.device("cpu")) is rows  # no copy on the host


def test_warm_up_sizes_reach_both_integer_specialisations():
    from expertmesh.cuda_graph import warm_up_sizes
    assert warm_up_sizes(40) == [2, 3, 4, 5, 8, 9, 16, 17, 32, 33]
    assert warm_up_sizes(16) == [2, 3, 4, 5, 8, 9, 16]
    sizes = warm_up_sizes(2048)
    assert any(n % 16 == 0 for n in sizes) and any(n % 16 and n > 16 for n in sizes)


def test_a_held_token_fills_in_as_advance_would_even_after_a_preemption():
    """Async scheduling: hold stands PLACEHOLDER for a token still on the device, fill puts it in and retires the
    sequence as advance would; a sequence preempted meanwhile that then finishes must not come back from waiting."""
    from expertmesh.attention_node.scheduler import PLACEHOLDER
    sched = make_scheduler(max_num_seqs=2, num_blocks=8, block_size=8)
    a, b = seq("a", 4, max_tokens=8), seq("b", 4, max_tokens=2)
    for s in (a, b):
        sched.add(s)
    assert sched.schedule() == [a, b]
    sched.hold(a), sched.hold(b)
    assert a.output_ids == [PLACEHOLDER] and a.new_token_ids() == [PLACEHOLDER] and a.num_cached == 4
    assert sched.fill(a, 7) is None and a.output_ids == [7] and a in sched.running
    assert sched.fill(b, 9) is None
    sched.hold(b)  # its second and last token: b leaves at once, its token still to come
    assert b not in sched.running and sched.fill(b, 3) == "length" and b.output_ids == [9, 3]
    sched.hold(a)
    sched._preempt(a)  # the next schedule preempted it while its token was on the device
    assert sched.waiting[0] is a
    assert sched.fill(a, 1) == "stop"  # 1 is EOS
    assert a not in sched.waiting and a not in sched.running and sched.blocks.num_free_blocks == 8
    with pytest.raises(RuntimeError, match="no held token"):
        sched.fill(a, 5)


def test_a_readmitted_sequence_refeeds_its_outputs_in_chunks_too():
    """After a preemption the sequence re-feeds prompt and outputs; past its prompt, a chunk still holds at most
    num_new tokens (the outputs' part of new_token_ids honours the budget as the prompt's does)."""
    sched = make_scheduler(max_num_seqs=1, budget=4, max_len=64)
    s = seq("a", 3, max_tokens=20)
    sched.add(s)
    for token in range(100, 110):
        sched.schedule()
        sched.advance(s, token)
    sched._preempt(s)
    fed = []
    while True:
        assert sched.schedule() == [s]
        fed.append(s.new_token_ids())
        assert len(fed[-1]) == s.num_new <= 4
        if s.samples:
            break
        sched.advance_chunk(s)
    assert sum(fed, []) == list(range(3)) + list(range(100, 110)) and [len(f) for f in fed] == [4, 4, 4, 1]


def run_steps(sched: Scheduler, count: int) -> list[list[Sequence]]:
    """count steps, every sequence given token 5: the sequences of each."""
    steps = []
    for _ in range(count):
        steps.append(sched.schedule())
        for s in steps[-1]:
            sched.advance(s, 5)
    return steps


def test_prompts_wait_to_join_decoding_sequences_together():
    """max_waiting_steps 2: beside decoding sequences a new prompt waits 2 steps, then joins; prompts whose tokens
    would fill the step's budget join at once; with nothing decoding, at once."""
    sched = Scheduler(BlockManager(64, 8), 4, 64, 64, eos_token_ids=(1,), max_waiting_steps=2)
    a, b = (seq(name, 4, max_tokens=30) for name in "ab")
    c, d, e = (seq(name, 24, max_tokens=8) for name in "cde")
    sched.add(a)
    assert sched.schedule() == [a]  # nothing decodes: no reason to wait
    sched.advance(a, 5)
    sched.add(b)
    steps = run_steps(sched, 3)
    assert steps == [[a], [a], [a, b]]  # b waited 2 steps, then joined
    for s in (c, d, e):
        sched.add(s)
    # 72 tokens waiting for a budget of 62 (64 less 2 decodes): no point waiting; e finds no slot
    assert sched.schedule() == [a, b, c, d] and (c.num_new, d.num_new) == (24, 24)
    assert list(sched.waiting) == [e] and sched.steps_held == 0


def test_a_prompt_waits_for_a_freed_slot_of_a_full_batch_too():
    """A full batch frees one slot at a time (a closed loop of clients keeps exactly that many prompts waiting): the
    wait counts from when a slot is free, and still applies."""
    sched = Scheduler(BlockManager(64, 8), 2, 64, 64, eos_token_ids=(1,), max_waiting_steps=2)
    a, b, c = (seq(name, 4, max_tokens=30) for name in "abc")
    sched.add(a), sched.add(b)
    assert sched.schedule() == [a, b]
    sched.add(c)
    for s in (a, b):
        sched.advance(s, 5)
    assert sched.schedule() == [a, b] and sched.steps_held == 0  # no slot: nothing to wait for
    sched.release(b)
    steps = run_steps(sched, 3)
    assert steps == [[a], [a], [a, c]]


def test_an_abort_stops_a_prompt_being_prefilled_at_once():
    """A long prompt aborted between its chunks leaves now, its blocks freed, instead of being fed to its end; one
    that decodes leaves with its next token."""
    sched = make_scheduler(max_num_seqs=2, budget=4, max_len=64)
    long, short = seq("long", 40, max_tokens=4), seq("short", 2, max_tokens=4)
    sched.add(short), sched.add(long)
    assert sched.schedule() == [short, long] and long.partial
    for s in (short, long):
        sched.advance(s, 5)
    used = sched.blocks.num_used_blocks
    assert sched.schedule() == [short, long] and long.partial  # its next chunk: the node awaits this step's launch
    assert sched.abort("long") is long and long not in sched.running and sched.blocks.num_used_blocks < used
    assert not long.samples  # the launch, done, still gives no token to it
    sched.advance(short, 5), sched.advance_chunk(long)
    assert sched.abort("short") is short and short in sched.running and short.aborted
    assert sched.schedule() == [short] and sched.advance(short, 5) == "abort"
