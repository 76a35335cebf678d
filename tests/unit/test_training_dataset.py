"""Packing documents into one token stream, and the windows that training and evaluation read."""

import numpy as np
import pytest
import torch

from expertmesh.training.corpus import DOMAINS
from expertmesh.training.dataset import domain_windows, pack_documents, sample_batch
from expertmesh.training.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["import os\n", "les fichiers\n"] * 10, vocab_size=280)


def test_documents_are_bos_text_eos_with_their_domain(tokenizer):
    tokens, domain_ids = pack_documents(["import os\n", "les fichiers\n"], ["python", "french"], tokenizer)
    first = tokenizer.encode("import os\n").ids
    second = tokenizer.encode("les fichiers\n").ids
    assert tokens.tolist() == first + [1] + second + [1]
    assert tokens.dtype == np.uint16 and tokens[0] == 0
    assert domain_ids.tolist() == ([DOMAINS.index("python")] * (len(first) + 1)
                                   + [DOMAINS.index("french")] * (len(second) + 1))


def test_sample_batch_targets_are_inputs_shifted_by_one():
    stream = torch.arange(1000, dtype=torch.int32)
    inputs, targets = sample_batch(stream, 8, 16, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (8, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and torch.equal(targets - inputs, torch.ones_like(inputs))
    again, _ = sample_batch(stream, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, again)


def test_domain_windows_cover_only_that_domain():
    tokens = np.arange(100, dtype=np.uint16)
    domain_ids = np.array([0] * 40 + [1] * 60, dtype=np.uint8)
    windows = domain_windows(tokens, domain_ids, 1, seq_len=10)
    assert windows.shape == (5, 11)
    assert windows.min().item() >= 40 and torch.equal(windows[1, :], torch.arange(50, 61))
    assert len(domain_windows(tokens, domain_ids, 1, seq_len=10, max_windows=2)) == 2
