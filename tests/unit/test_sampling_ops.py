"""Batched sampling: seeded draws independent of the batch, the right distribution, top-p and greedy rows."""
import torch

from expertmesh.ops.sampling import SamplingBatch, sample, token_logprobs, top_k_top_p_mask, uniform_noise


def batch_of(temperature, top_p, seed, draw):
    t = torch.tensor(temperature, dtype=torch.float32)
    p = torch.tensor(top_p, dtype=torch.float32)
    return SamplingBatch(t, p, torch.tensor(seed, dtype=torch.int64), torch.tensor(draw, dtype=torch.int64),
                         any_top_p=bool((p < 1).any()), all_greedy=bool((t == 0).all()))


def test_a_seeded_row_draws_the_same_token_in_any_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    alone = [int(sample(logits[2:3], batch_of([0.8], [0.9], [12345], [d]))[0]) for d in range(30)]
    others = [int(sample(logits, batch_of([1.0, 0.0, 0.8, 0.7, 1.2], [1.0, 1.0, 0.9, 0.5, 1.0],
                                          [1, 2, 12345, 4, 5], [d, d, d, 0, 7]))[2]) for d in range(30)]
    assert alone == others and len(set(alone)) > 3  # same draws, and they do vary from step to step


def test_draws_follow_the_softmax_at_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    rows = logits.shape[0]
    tokens = sample(logits, batch_of([2.0] * rows, [1.0] * rows, list(range(rows)), [0] * rows))
    freq = torch.bincount(tokens, minlength=4).float() / rows
    expected = torch.softmax(logits[0] / 2.0, dim=-1)
    assert (freq - expected).abs().max() < 0.03, (freq, expected)


def test_noise_is_uniform_and_differs_by_seed_draw_and_token():
    u = uniform_noise(torch.tensor([1, 2, 1], dtype=torch.int64), torch.tensor([0, 0, 1], dtype=torch.int64), 20000)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    big_seed = uniform_noise(torch.tensor([1, 1 + (1 << 40)], dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 64)
    assert not torch.equal(big_seed[0], big_seed[1])  # the high half of a seed counts too


def test_top_p_keeps_the_nucleus_and_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert top_k_top_p_mask(logits, None, torch.tensor([0.7])).tolist() == [[False, False, True, True]]
    assert top_k_top_p_mask(logits, None, torch.tensor([1e-6])).tolist() == [[False, True, True, True]]
    logits = torch.randn(3, 50)
    narrow = sample(logits, batch_of([1.0, 0.0, 1.0], [1e-6, 1.0, 1.0], [3, 3, 3], [0, 0, 0]))
    assert narrow[:2].tolist() == logits[:2].argmax(-1).tolist()
    assert torch.equal(sample(logits, batch_of([0.0] * 3, [1.0] * 3, [0] * 3, [0] * 3)), logits.argmax(-1))


def test_token_logprobs():
    logits = torch.randn(50)
    lp, top = token_logprobs(logits, 4, 2)
    assert abs(lp - torch.log_softmax(logits, -1)[4].item()) < 1e-6 and top[0][0] == int(logits.argmax())
