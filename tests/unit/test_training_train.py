"""End to end on a tiny synthetic corpus: tokenizer, packing, a few training steps on CPU, and a
checkpoint that transformers loads and that agrees with the training model."""

import json

import pytest
import torch
from tokenizers import Tokenizer

from expertmesh.training.corpus import DOMAINS
from expertmesh.training.dataset import pack_corpus
from expertmesh.training.tokenizer import save_tokenizer, train_tokenizer
from expertmesh.training.train import main as train_main

DOCS = {"python": "def f(x):\n    return x + 1\n", "c": "int f(int x) { return x + 1; }\n",
        "shell": "#!/bin/sh\nset -e\necho ok\n", "english": "The file is opened for reading.\n",
        "french": "Le fichier est ouvert en lecture.\n", "german": "Die Datei wird zum Lesen geöffnet.\n"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    data = tmp_path_factory.mktemp("corpus")
    for split, copies in (("train", 30), ("validation", 4), ("test", 4)):
        with open(data / f"{split}.jsonl", "w") as handle:
            for i in range(copies):
                for domain in DOMAINS:
                    record = {"text": DOCS[domain] * 3, "domain": domain, "doc_id": f"{domain}/{split}/{i}"}
                    handle.write(json.dumps(record) + "\n")
    texts = [DOCS[d] for d in DOMAINS] * 5
    save_tokenizer(train_tokenizer(texts, vocab_size=300), data / "tokenizer")
    pack_corpus(data, Tokenizer.from_file(str(data / "tokenizer" / "tokenizer.json")), data / "packed")
    return data


def test_tiny_training_run_writes_a_loadable_checkpoint(corpus, tmp_path):
    out = tmp_path / "model"
    train_main(["--data", str(corpus), "--out", str(out), "--log", str(tmp_path / "log.json"),
                "--steps", "12", "--layers", "1", "--hidden", "32", "--intermediate", "16", "--experts", "4",
                "--heads", "4", "--kv-heads", "2", "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "2",
                "--log-every", "4", "--eval-every", "6", "--eval-windows", "2", "--sample-tokens", "4",
                "--max-positions", "64", "--lr", "1e-2"])
    log = json.loads((out / "training_log.json").read_text())
    assert [point["step"] for point in log["curve"]] == [4, 8, 12]
    assert log["curve"][-1]["loss"] < log["curve"][0]["loss"]
    assert set(log["validation"]["loss"]) == set(DOMAINS) and set(log["test"]["loss"]) == set(DOMAINS)
    assert len(log["validation"]["expert_usage"]) == 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()

    transformers = pytest.importorskip("transformers")
    from expertmesh.training.checkpoint import load_checkpoint
    hf = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert (load_checkpoint(out)(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
