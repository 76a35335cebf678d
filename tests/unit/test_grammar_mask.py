"""The grammar's token mask (ops/grammar_mask.py) against xgrammar's own apply_token_bitmask_inplace, on bitmasks
xgrammar's matchers fill, and on random ones."""
from __future__ import annotations

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from expertmesh.ops.grammar_mask import apply_token_bitmask, bitmask_words


@pytest.mark.parametrize("vocab", [512, 1000, 32 * 7])
def test_mask_equals_xgrammars_reference(vocab):
    generator = torch.Generator().manual_seed(vocab)
    bitmask = torch.randint(-2**31, 2**31, (5, bitmask_words(vocab)), generator=generator, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[1] = -1  # a row without grammar: every token allowed, nothing changes
    logits = torch.randn(5, vocab, generator=generator)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask)
    masked = apply_token_bitmask(logits, bitmask)
    assert torch.equal(masked, expected)
    assert torch.equal(masked[1], logits[1])


def test_mask_of_a_json_matcher_equals_xgrammars_reference():
    vocab = [chr(c) for c in range(32, 127)] + ["{\"", "\":", "}", "</s>"]
    info = xgr.TokenizerInfo(vocab, vocab_size=len(vocab) + 3, stop_token_ids=[len(vocab) - 1])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_builtin_json_grammar())
    bitmask = xgr.allocate_token_bitmask(2, info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    logits = torch.randn(2, info.vocab_size, generator=torch.Generator().manual_seed(0))
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask)
    masked = apply_token_bitmask(logits, bitmask)
    assert torch.equal(masked, expected)
    allowed = {vocab[t] for t in torch.isfinite(masked[0]).nonzero().flatten().tolist()}
    assert "{" in allowed and "{\"" in allowed and "a" not in allowed  # a JSON value's first token
