"""Writes a small random MoE checkpoint in Hugging Face format (config, safetensors, tokenizer).

Deterministic for a seed; weights are scaled so activations and logits stay O(1), which keeps greedy
decoding far from ties and so comparable across implementations."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .spec import ModelSpec
from .weights import names_of


@dataclass
class RandomModelShape:
    arch: str = "mixtral"  # mixtral | qwen3_moe
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128  # experts (and dense layers of Mixtral-like shapes)
    dense_intermediate_size: int = 192  # Qwen3-MoE dense layers
    num_experts: int = 8
    top_k: int = 2
    norm_topk_prob: bool = True  # Qwen3-MoE only; Mixtral always renormalises
    mlp_only_layers: list[int] = field(default_factory=list)  # Qwen3-MoE only
    decoder_sparse_step: int = 1  # Qwen3-MoE only
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0


def hf_config(shape: RandomModelShape, bos_id: int, eos_id: int) -> dict:
    common = {
        "vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size, "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim, "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6, "rope_theta": shape.rope_theta, "tie_word_embeddings": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "hidden_act": "silu", "torch_dtype": "float32",
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "num_experts_per_tok": shape.top_k, "router_aux_loss_coef": 0.001,
    }
    if shape.arch == "mixtral":
        return {**common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "intermediate_size": shape.intermediate_size, "num_local_experts": shape.num_experts,
                "sliding_window": None, "output_router_logits": False}
    if shape.arch == "qwen3_moe":
        return {**common, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "intermediate_size": shape.dense_intermediate_size, "moe_intermediate_size": shape.intermediate_size,
                "num_experts": shape.num_experts, "norm_topk_prob": shape.norm_topk_prob,
                "mlp_only_layers": list(shape.mlp_only_layers), "decoder_sparse_step": shape.decoder_sparse_step,
                "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                "output_router_logits": False}
    raise ValueError(f"unknown architecture {shape.arch!r}; choose mixtral or qwen3_moe")


def random_tensors(spec: ModelSpec, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def linear(out_dim: int, in_dim: int) -> torch.Tensor:
        return torch.randn(out_dim, in_dim, generator=generator) / in_dim ** 0.5

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(dim, generator=generator)

    names = names_of(spec)
    hidden, head_dim = spec.hidden_size, spec.head_dim
    tensors = {"model.embed_tokens.weight": torch.randn(spec.vocab_size, hidden, generator=generator)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = norm(hidden)
        tensors[f"{p}.self_attn.q_proj.weight"] = linear(spec.num_heads * head_dim, hidden)
        tensors[f"{p}.self_attn.k_proj.weight"] = linear(spec.num_kv_heads * head_dim, hidden)
        tensors[f"{p}.self_attn.v_proj.weight"] = linear(spec.num_kv_heads * head_dim, hidden)
        tensors[f"{p}.self_attn.o_proj.weight"] = linear(hidden, spec.num_heads * head_dim)
        if spec.qk_norm:
            tensors[f"{p}.self_attn.q_norm.weight"] = norm(head_dim)
            tensors[f"{p}.self_attn.k_norm.weight"] = norm(head_dim)
        tensors[f"{p}.post_attention_layernorm.weight"] = norm(hidden)
        if spec.moe_layers[i]:
            tensors[names.router_name(i)] = linear(spec.num_experts, hidden)
            inter = spec.expert_intermediate_size
            for e in range(spec.num_experts):
                gate, up, down = names.expert_names(i, e)
                tensors[gate], tensors[up], tensors[down] = linear(inter, hidden), linear(inter, hidden), linear(hidden, inter)
        else:
            gate, up, down = names.dense_mlp_names(i)
            inter = spec.dense_intermediate_size
            tensors[gate], tensors[up], tensors[down] = linear(inter, hidden), linear(inter, hidden), linear(hidden, inter)
    tensors["model.norm.weight"] = norm(hidden)
    tensors["lm_head.weight"] = linear(spec.vocab_size, hidden) * 4.0  # spread logits: no near-ties in argmax
    return tensors


def make_tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE tokenizer of exactly vocab_size ids (<s>=0, </s>=1), trained on seeded pseudo-text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    syllables = ["de", "la", "def", "self", "re", "turn", "in", "the", "an", "on", "er", "es", "st", "ing", "ion"]
    lines = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(12))
             for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    filler = [f"<extra_{i}>" for i in range(vocab_size - tokenizer.get_vocab_size())]
    tokenizer.add_special_tokens(filler)  # every id a random model can emit decodes to something
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} ids, wanted {vocab_size} (vocab too small?)")
    return tokenizer


def make_model(out_dir: str | Path, shape: RandomModelShape, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    if shape.vocab_size < 300:
        raise ValueError(f"vocab_size={shape.vocab_size}: need at least 300 (256 bytes + specials + merges)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(shape.vocab_size, seed)
    bos_id, eos_id = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    config = hf_config(shape, bos_id, eos_id)
    spec = ModelSpec.from_hf_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: t.to(dtype).contiguous() for name, t in random_tensors(spec, generator).items()}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False}, indent=2))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
         "model_max_length": shape.max_position_embeddings}, indent=2))
    return out
