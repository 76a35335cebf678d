"""The shipped default checkpoint: loads in transformers, writes Python and French where prompted,
and our plain-PyTorch training model computes the same function as transformers' Mixtral."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, MixtralForCausalLM  # noqa: E402

from expertmesh.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from expertmesh.training.model import MixtralModel, MixtralShape  # noqa: E402

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"
PYTHON_MARKERS = ("(", ")", ":", "self", "return", "def ", "import ", " = ", "os.")
FRENCH_WORDS = (" le ", " de ", " la ", " les ", " des ", " est ", " et ", " sur ", " du ", " une ", " pour ")


@pytest.fixture(scope="module")
def hf_model():
    return MixtralForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


def greedy(model, tokenizer, prompt: str, new_tokens: int = 40) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_checkpoint_files_and_config():
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    weights = sorted(CHECKPOINT.glob("model*.safetensors"))
    assert weights and sum(f.stat().st_size for f in weights) <= 25_000_000
    tokenizer_config = json.loads((CHECKPOINT / "tokenizer_config.json").read_text())
    vocab = json.loads((CHECKPOINT / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert ids[tokenizer_config["bos_token"]] == config["bos_token_id"]
    assert ids[tokenizer_config["eos_token"]] == config["eos_token_id"]
    log = json.loads((CHECKPOINT / "training_log.json").read_text())
    assert set(log["validation"]["loss"]) == {"python", "c", "shell", "english", "french", "german"}


def test_python_prompt_continues_as_python(hf_model, tokenizer):
    # No trailing space in the prompt: byte-level BPE glues spaces to the next word, so "def " ends
    # on a token that never occurs in training text.
    text = greedy(hf_model, tokenizer, "import os\n\ndef")
    assert sum(marker in text for marker in PYTHON_MARKERS) >= 3, text
    assert not any(word in text for word in FRENCH_WORDS), text


def test_french_prompt_continues_in_french(hf_model, tokenizer):
    text = greedy(hf_model, tokenizer, "Cette commande permet de")
    assert sum(word in text for word in FRENCH_WORDS) >= 2, text
    assert "self" not in text and "return" not in text, text


def test_training_model_matches_shipped_checkpoint(hf_model, tokenizer):
    ours = load_checkpoint(CHECKPOINT, torch.float32).eval()
    ids = tokenizer("import os\n\ndef main():\n    return os.getcwd()", return_tensors="pt").input_ids
    with torch.no_grad():
        difference = (ours(ids).logits - hf_model(ids).logits).abs().max().item()
    assert difference < 1e-4


def test_training_model_matches_transformers_on_random_tiny_config(tmp_path):
    torch.manual_seed(0)
    shape = MixtralShape(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                         num_experts_per_tok=2, rope_theta=500.0, max_position_embeddings=64)
    ours = MixtralModel(shape).eval()
    save_checkpoint(ours, tmp_path, max_shard_bytes=60_000, dtype=torch.float32)  # sharded on purpose
    assert (tmp_path / "model.safetensors.index.json").is_file()
    theirs = MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, shape.vocab_size, (3, 21))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() < 1e-4
