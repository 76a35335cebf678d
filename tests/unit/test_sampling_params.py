"""vLLM's sampling parameters in the batched sampler, each against an independent computation on the same logits:
transformers' logits processors (repetition penalty, sequence bias, min length, top-k, min-p, top-p) and a hand
count for presence and frequency. Rows with different parameters share one batch, as they do when served."""
import pytest
import torch
from transformers.generation.logits_process import (MinLengthLogitsProcessor, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from expertmesh.attention_node.sampler import sample_step, sampling_batch
from expertmesh.attention_node.scheduler import Sequence
from expertmesh.ops.sampling import adjust, sample, truncate
from expertmesh.transport.protocol import SamplingParams

VOCAB = 64
EOS = (2,)


def seq(prompt, output, **params) -> Sequence:
    s = Sequence("r", list(prompt), SamplingParams(max_tokens=32, **params), seed=11)
    s.output_ids = list(output)
    return s


def logits_of(rows: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(rows, VOCAB) * 3  # both signs, so the repetition penalty's two branches both count


def adjusted(logits, seqs):
    return adjust(logits, sampling_batch(seqs, "cpu", VOCAB, EOS))


def test_repetition_penalty_equals_transformers_over_prompt_and_output():
    seqs = [seq([5, 6, 6, 9], [9, 12, 40], repetition_penalty=1.7),
            seq([1, 3], [], repetition_penalty=0.6),  # < 1 rewards repeats
            seq([5, 6], [7], temperature=0.0),  # no penalty: untouched
            seq([8], [30, 31, 30], repetition_penalty=1.3)]
    logits = logits_of(len(seqs))
    ours = adjusted(logits, seqs)
    for i, s in enumerate(seqs):
        ids = torch.tensor([s.prompt_ids + s.output_ids])
        expected = RepetitionPenaltyLogitsProcessor(s.sampling.repetition_penalty)(ids, logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i:i + 1], expected)
    assert not torch.equal(ours[0], logits[0]) and torch.equal(ours[2], logits[2])


def test_presence_and_frequency_penalties_count_the_output_only():
    seqs = [seq([4, 4, 4], [4, 10, 10, 10, 11], presence_penalty=0.5, frequency_penalty=0.25),
            seq([10], [12, 12], presence_penalty=-1.0),
            seq([3], [3, 3], frequency_penalty=2.0, repetition_penalty=1.5)]
    logits = logits_of(len(seqs))
    ours = adjusted(logits, seqs)
    for i, s in enumerate(seqs):
        p = s.sampling
        expected = logits[i].clone()
        for token in set(s.prompt_ids) | set(s.output_ids):  # vLLM's repetition penalty first
            value = expected[token]
            expected[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(s.output_ids):
            expected[token] -= p.frequency_penalty * s.output_ids.count(token) + p.presence_penalty
        torch.testing.assert_close(ours[i], expected)
    assert ours[0][4] != logits[0][4] - 0.5 - 0.25 * 4  # the prompt's three 4s do not count


def test_logit_bias_equals_transformers_sequence_bias():
    seqs = [seq([1], [], logit_bias=[[3, 5.0], [60, -100.0]]), seq([1], [], logit_bias=[[7, 1.5]]), seq([1], [])]
    logits = logits_of(len(seqs))
    ours = adjusted(logits, seqs)
    ids = torch.tensor([[1]])
    for i, s in enumerate(seqs):
        biased = (SequenceBiasLogitsProcessor([[[t], b] for t, b in s.sampling.logit_bias])(ids, logits[i:i + 1])
                  if s.sampling.logit_bias else logits[i:i + 1])
        torch.testing.assert_close(ours[i:i + 1], biased)


def test_min_tokens_masks_eos_and_stop_token_ids_as_transformers_min_length():
    prompt = [5, 6, 7]
    seqs = [seq(prompt, [9], min_tokens=3, stop_token_ids=[11, 12]),  # short of min_tokens: all stop ids masked
            seq(prompt, [9, 9, 9], min_tokens=3, stop_token_ids=[11]),  # reached: nothing masked
            seq(prompt, [], min_tokens=2, ignore_eos=True, stop_token_ids=[13]),  # EOS is no stop token here
            seq(prompt, [])]
    logits = logits_of(len(seqs))
    ours = adjusted(logits, seqs)
    for i, s in enumerate(seqs):
        p = s.sampling
        stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(EOS))
        ids = torch.tensor([s.prompt_ids + s.output_ids])
        expected = MinLengthLogitsProcessor(len(prompt) + p.min_tokens, stop_ids)(ids, logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i:i + 1], expected)
    assert ours[0][[11, 12, 2]].isneginf().all() and ours[2][13].isneginf() and not ours[2][2].isneginf()
    assert seqs[0].may_stop is False and seqs[1].may_stop is True


def test_top_k_min_p_and_top_p_equal_transformers_warpers():
    seqs = [seq([1], [], temperature=0.7, top_k=5), seq([1], [], temperature=1.3, min_p=0.2),
            seq([1], [], temperature=2.0, top_k=6, top_p=0.5), seq([1], [], temperature=0.9, top_k=-1),
            seq([1], [], temperature=1.0, top_k=1000)]  # past the vocabulary: all of it
    logits = logits_of(len(seqs))
    batch = sampling_batch(seqs, "cpu", VOCAB, EOS)
    scaled = logits / batch.temperature[:, None]
    ours = truncate(scaled, batch)
    warpers = [[TopKLogitsWarper(5)], [MinPLogitsWarper(0.2)], [TopKLogitsWarper(6), TopPLogitsWarper(0.5)], [], []]
    ids = torch.tensor([[1]])
    for i, row_warpers in enumerate(warpers):
        expected = scaled[i:i + 1].clone()
        for warper in row_warpers:
            expected = warper(ids, expected)
        torch.testing.assert_close(ours[i:i + 1], expected)
    kept = (~ours.isneginf()).sum(-1).tolist()
    assert kept[0] == 5 and 1 < kept[1] < VOCAB and 1 <= kept[2] < 6 and kept[3] == kept[4] == VOCAB


def test_sampling_obeys_the_parameters():
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB)
    seqs = [seq([1], [], temperature=1.0, logit_bias=[[17, 100.0]]),  # forced, even though sampled
            seq([1], [], temperature=1.5, top_k=1),  # top_k 1 is greedy
            seq([1], [], temperature=0.0, logit_bias=[[int(logits[2].argmax()), -100.0]]),  # greedy rows take biases
            seq([1], [], temperature=1.0, stop_token_ids=[23], logit_bias=[[23, 100.0]], min_tokens=1)]
    for draw in range(20):
        for s in seqs:
            s.output_ids = [0] * draw
        seqs[3].output_ids = []  # short of min_tokens: the biased stop token stays masked
        tokens, _ = sample_step(logits, seqs, EOS)
        assert tokens[0] == 17 and tokens[1] == int(logits[1].argmax()) and tokens[3] != 23
        assert tokens[2] == int(logits[2].topk(2).indices[1])


def test_a_penalised_seeded_row_draws_the_same_alone_or_in_a_batch():
    logits = logits_of(3)
    row = seq([4, 5], [6, 6, 7], temperature=0.8, seed=3, presence_penalty=1.0, repetition_penalty=1.2, top_k=20)
    others = [seq([1, 2], [3], temperature=1.0, frequency_penalty=0.5, logit_bias=[[9, 2.0]]), seq([8], [], temperature=0.0)]
    alone, _ = sample_step(logits[1:2], [row], EOS)
    together, _ = sample_step(logits, [others[0], row, others[1]], EOS)
    assert alone[0] == together[1]


def test_all_greedy_batches_without_the_parameters_skip_their_work():
    seqs = [seq([1, 2], [3], temperature=0.0), seq([4], [], temperature=0.0, top_k=3, min_p=0.5)]
    batch = sampling_batch(seqs, "cpu", VOCAB, EOS)
    assert batch.bias is None and batch.penalties is None  # nothing to scatter, nothing to count
    logits = logits_of(2)
    assert torch.equal(sample(logits, batch), logits.argmax(-1))
    penalised = sampling_batch([seqs[0], seq([4], [5], presence_penalty=0.1)], "cpu", VOCAB, EOS)
    assert penalised.penalties is not None and penalised.penalties.prompt_ids is None  # no repetition penalty
    assert penalised.penalties.output_ids[0].tolist() == [VOCAB]  # the row without a penalty brings no ids


@pytest.mark.parametrize("params", [{"stop_token_ids": [5]}, {"stop_token_ids": [5], "ignore_eos": True}])
def test_stop_token_ids_finish_once_min_tokens_are_out(params):
    from expertmesh.attention_node.scheduler import Scheduler
    from expertmesh.kv.block_manager import BlockManager
    scheduler = Scheduler(BlockManager(16, 4), 4, 64, 64, EOS)
    s = seq([1], [], min_tokens=2, **params)
    s.output_ids = [5]
    assert scheduler.finish_reason(s) is None  # one token: min_tokens not reached
    s.output_ids = [3, 5]
    assert scheduler.finish_reason(s) == "stop"
    s.output_ids = [3, 2]
    assert scheduler.finish_reason(s) == (None if params.get("ignore_eos") else "stop")
