"""Scheduler, sampler and microbatch split of the attention node."""
import torch

from expertmesh.attention_node.kv_cache import KVCache
from expertmesh.attention_node.model_runner import split_microbatches
from expertmesh.attention_node.sampler import make_generator, sample, token_logprobs
from expertmesh.attention_node.scheduler import Scheduler, Sequence
from expertmesh.model.spec import ModelSpec
from expertmesh.transport.protocol import SamplingParams


def seq(rid, prompt_len, max_tokens=4, **kw):
    return Sequence(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw), None)


def make_scheduler(mixtral_dir, slots=2, budget=10, max_len=32):
    kv = KVCache(ModelSpec.from_dir(mixtral_dir), slots, max_len, torch.float32, "cpu")
    return Scheduler(kv, budget, eos_token_ids=(1,))


def test_admission_respects_slots_and_token_budget(mixtral_dir):
    sched = make_scheduler(mixtral_dir)
    a, b, c = seq("a", 8), seq("b", 8), seq("c", 3)
    for s in (a, b, c):
        sched.add(s)
    assert sched.schedule() == [a]  # b's 8 tokens exceed what is left of the budget of 10
    a.num_cached, a.output_ids = 8, [5]
    assert sched.schedule() == [a, b]  # budget 10 - 1 decode token >= 8
    assert sched.waiting[0] is c  # no slot left
    sched.release(a)
    assert sched.schedule() == [b, c]


def test_advance_appends_the_token_and_frees_the_slot_when_done(mixtral_dir):
    sched = make_scheduler(mixtral_dir, slots=1)
    s = seq("a", 4, max_tokens=2)
    sched.add(s)
    assert sched.schedule() == [s]
    assert sched.advance(s, 7) is None
    assert (s.num_cached, s.output_ids, sched.kv_cache.free_slots) == (4, [7], 0)
    assert sched.advance(s, 8) == "length"
    assert (s.num_cached, s.output_ids, sched.kv_cache.free_slots, sched.running) == (5, [7, 8], 1, [])


def test_finish_reasons(mixtral_dir):
    sched = make_scheduler(mixtral_dir)
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


def test_seeded_sampling_is_reproducible_and_top_p_narrows():
    logits = torch.randn(1, 50)
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=3)
    draws = [[sample(logits, [params], [g])[0] for _ in range(20)] for g in
             (make_generator(params, 0), make_generator(params, 0))]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    narrow = SamplingParams(temperature=1.0, top_p=1e-6, seed=3)
    g = make_generator(narrow, 0)
    assert {sample(logits, [narrow], [g])[0] for _ in range(20)} == {int(logits.argmax())}
    assert sample(logits, [SamplingParams(temperature=0.0)], [None]) == [int(logits.argmax())]
    lp, top = token_logprobs(logits[0], 4, 2)
    assert abs(lp - torch.log_softmax(logits[0], -1)[4].item()) < 1e-6 and top[0][0] == int(logits.argmax())


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
