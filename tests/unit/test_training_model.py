"""The training model's MoE against an explicit per-token sparse loop, its auxiliary loss, the
checkpoint round trip, and the learning-rate schedule."""

import torch
import torch.nn.functional as F

from expertmesh.training.checkpoint import load_checkpoint, reshard, save_checkpoint
from expertmesh.training.model import MixtralModel, MixtralShape, SparseMoE, load_balancing_loss
from expertmesh.training.train import learning_rate

TINY = MixtralShape(vocab_size=50, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                    max_position_embeddings=32)


def test_dense_masked_moe_equals_sparse_dispatch():
    torch.manual_seed(0)
    moe = SparseMoE(TINY)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(11, TINY.hidden_size)
    out, probs, top_indices = moe(x)
    expected = torch.zeros_like(x)
    for t in range(len(x)):
        weights = probs[t, top_indices[t]] / probs[t, top_indices[t]].sum()
        for weight, e in zip(weights, top_indices[t]):
            hidden = F.silu(moe.w1[e] @ x[t]) * (moe.w3[e] @ x[t])
            expected[t] += weight * (moe.w2[e] @ hidden)
    assert torch.allclose(out, expected, atol=1e-5)


def test_unchosen_experts_get_no_gradient():
    torch.manual_seed(1)
    moe = SparseMoE(TINY)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, TINY.hidden_size)
    out, _, top_indices = moe(x)
    out.sum().backward()
    for e in range(TINY.num_local_experts):
        touched = moe.w1.grad[e].abs().sum().item() > 0
        assert touched == (e in top_indices[0].tolist())


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_skewed():
    experts, tokens = 4, 8
    uniform_probs = torch.full((tokens, experts), 1 / experts)
    balanced = torch.tensor([[t % experts, (t + 1) % experts] for t in range(tokens)])
    assert abs(load_balancing_loss(uniform_probs, balanced).item() - 1.0) < 1e-6
    skewed_probs = torch.tensor([[0.7, 0.2, 0.05, 0.05]]).repeat(tokens, 1)
    skewed = torch.tensor([[0, 1]]).repeat(tokens, 1)
    assert load_balancing_loss(skewed_probs, skewed).item() > 1.5


def test_checkpoint_round_trip_sharded_and_single(tmp_path):
    torch.manual_seed(2)
    model = MixtralModel(TINY).eval()
    names = save_checkpoint(model, tmp_path, max_shard_bytes=20_000, dtype=torch.float32)
    assert len(names) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        reference = model(ids).logits
        assert torch.equal(load_checkpoint(tmp_path)(ids).logits, reference)
        assert reshard(tmp_path, None) == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
        assert torch.equal(load_checkpoint(tmp_path)(ids).logits, reference)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    peak, total, warmup = 1e-3, 1000, 100
    rates = [learning_rate(s, total, peak, warmup, 0.1) for s in range(total + 1)]
    assert rates[0] == peak / warmup and abs(rates[warmup - 1] - peak) < 1e-12
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))
    assert abs(rates[-1] - 0.1 * peak) < 1e-12
