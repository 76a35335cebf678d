"""The batched sampler on a GPU equals its CPU run (which tests/unit/test_sampling_params.py holds to transformers'
logits processors): every vLLM parameter in one batch, the same adjusted logits and the same tokens, seeded draws
included (their noise is a hash of seed, draw and token id, the same on any device), with no host sync."""
import pytest
import torch

from expertmesh.attention_node.sampler import sampling_batch
from expertmesh.attention_node.scheduler import Sequence
from expertmesh.ops.sampling import adjust, sample
from expertmesh.transport.protocol import SamplingParams

pytestmark = pytest.mark.gpu

VOCAB, EOS = 1000, (2,)


def batch_of_every_parameter() -> list[Sequence]:
    rows = [dict(temperature=0.0), dict(temperature=0.0, repetition_penalty=1.4, logit_bias=[[7, 3.0]]),
            dict(temperature=0.8, top_p=0.9, seed=5), dict(temperature=1.2, top_k=20, min_p=0.02, seed=6),
            dict(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3, seed=7),
            dict(temperature=0.7, min_tokens=10, stop_token_ids=[9, 11], seed=8)]
    seqs = []
    for i, params in enumerate(rows):
        s = Sequence(f"r{i}", [3, 4, 5, 4], SamplingParams(max_tokens=32, **params), seed=100 + i)
        s.output_ids = [4, 9, 9, 12][:i]
        seqs.append(s)
    return seqs


def test_the_gpu_sampler_equals_its_cpu_run():
    seqs = batch_of_every_parameter()
    torch.manual_seed(0)
    logits = torch.randn(len(seqs), VOCAB) * 4
    cpu = sampling_batch(seqs, "cpu", VOCAB, EOS)
    on_gpu = logits.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = sampling_batch(seqs, "cuda", VOCAB, EOS)
        adjusted, tokens = adjust(on_gpu, gpu), sample(on_gpu, gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(adjusted.cpu(), adjust(logits, cpu))
    assert tokens.tolist() == sample(logits, cpu).tolist()
