"""Byte-level BPE tokenizer: special tokens, <s> on every encoding, lossless round trips, HF loading."""

import json

import pytest

from expertmesh.training.tokenizer import BOS_TOKEN, EOS_TOKEN, save_tokenizer, train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "Les options suivantes sont disponibles.\n",
         "#include <stdio.h>\nint main(void) { return 0; }\n", "Die Datei wird geöffnet.\n"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=320)


def test_special_tokens_come_first_and_bos_is_added(tokenizer):
    assert tokenizer.token_to_id(BOS_TOKEN) == 0 and tokenizer.token_to_id(EOS_TOKEN) == 1
    assert tokenizer.encode("def add").ids[0] == 0
    assert 1 not in tokenizer.encode("def add").ids
    assert 256 + 2 < tokenizer.get_vocab_size() <= 320


def test_round_trip_is_lossless_even_for_unseen_characters(tokenizer):
    for text in ["def add(a, b):\n\treturn a+b", "naïve café ∑ 漢字 🙂", "  leading and trailing  \n"]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_merges_compress_the_training_text(tokenizer):
    text = TEXTS[0]
    assert len(tokenizer.encode(text).ids) < 0.6 * len(text.encode("utf-8"))


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_saved_tokenizer_loads_in_transformers(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == (BOS_TOKEN, EOS_TOKEN)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id) == (0, 1)
    assert hf("def add").input_ids == tokenizer.encode("def add").ids
