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

from . import deepseek_v3
from .spec import ModelSpec
from .weights import names_of


@dataclass
class RandomModelShape:
    arch: str = "mixtral"  # mixtral | qwen3_moe | deepseek_v3
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128  # experts (and dense layers of Mixtral-like shapes)
    dense_intermediate_size: int = 192  # Qwen3-MoE and DeepSeek-V3 dense layers
    num_experts: int = 8
    top_k: int = 2
    norm_topk_prob: bool = True  # Qwen3-MoE and DeepSeek-V3; Mixtral always renormalises
    mlp_only_layers: list[int] = field(default_factory=list)  # Qwen3-MoE only
    decoder_sparse_step: int = 1  # Qwen3-MoE only
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    # DeepSeek-V3 only: MLA ranks and head split, routing groups, dense first layers, shared experts, YaRN
    q_lora_rank: int = 32  # 0: one full q_proj
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    num_expert_groups: int = 4
    top_groups: int = 2
    first_k_dense_replace: int = 1
    num_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    yarn_factor: float = 0.0  # > 1: YaRN rotary over max_position_embeddings / yarn_factor pretraining positions


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
    if shape.arch == "deepseek_v3":  # the names transformers 5 writes (n_routed_experts, rope_parameters)
        rope = {"rope_type": "default", "rope_theta": shape.rope_theta}
        if shape.yarn_factor > 1:
            rope = {**rope, "rope_type": "yarn", "factor": shape.yarn_factor, "beta_fast": 32, "beta_slow": 1,
                    "mscale": 1.0, "mscale_all_dim": 0.8,  # both YaRN scales differ from 1: cos/sin and softmax
                    "original_max_position_embeddings": int(shape.max_position_embeddings / shape.yarn_factor)}
        common.pop("rope_theta")
        return {**common, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                "num_key_value_heads": shape.num_heads,  # MLA expands the latent to every head
                "head_dim": shape.qk_rope_head_dim, "intermediate_size": shape.dense_intermediate_size,
                "moe_intermediate_size": shape.intermediate_size, "n_routed_experts": shape.num_experts,
                "n_shared_experts": shape.num_shared_experts, "n_group": shape.num_expert_groups,
                "topk_group": shape.top_groups, "first_k_dense_replace": shape.first_k_dense_replace,
                "norm_topk_prob": shape.norm_topk_prob, "routed_scaling_factor": shape.routed_scaling_factor,
                "q_lora_rank": shape.q_lora_rank or None, "kv_lora_rank": shape.kv_lora_rank,
                "qk_nope_head_dim": shape.qk_nope_head_dim, "qk_rope_head_dim": shape.qk_rope_head_dim,
                "v_head_dim": shape.v_head_dim, "rope_parameters": rope, "rope_interleave": True,
                "attention_bias": False, "num_nextn_predict_layers": 0}
    raise ValueError(f"unknown architecture {shape.arch!r}; choose mixtral, qwen3_moe or deepseek_v3")


def random_tensors(spec: ModelSpec, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def linear(out_dim: int, in_dim: int) -> torch.Tensor:
        return torch.randn(out_dim, in_dim, generator=generator) / in_dim ** 0.5

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(dim, generator=generator)

    names = names_of(spec)
    hidden = spec.hidden_size

    def mlp(gate_up_down: tuple[str, str, str], inter: int) -> None:
        gate, up, down = gate_up_down
        tensors[gate], tensors[up], tensors[down] = linear(inter, hidden), linear(inter, hidden), linear(hidden, inter)

    tensors = {"model.embed_tokens.weight": torch.randn(spec.vocab_size, hidden, generator=generator)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = norm(hidden)
        attention_tensors = _mla_tensors if spec.mla is not None else _gqa_tensors
        tensors.update(attention_tensors(spec, i, linear, norm))
        tensors[f"{p}.post_attention_layernorm.weight"] = norm(hidden)
        if not spec.moe_layers[i]:
            mlp(names.dense_mlp_names(i), spec.dense_intermediate_size)
            continue
        tensors[names.router_name(i)] = linear(spec.num_experts, hidden)
        for e in range(spec.num_experts):
            mlp(names.expert_names(i, e), spec.expert_intermediate_size)
        if spec.scoring == "sigmoid":  # a bias as large as the scores' spread, so that it changes choices
            tensors[names.router_bias_name(i)] = 0.1 * torch.randn(spec.num_experts, generator=generator)
        if spec.shared_intermediate_size:
            mlp(names.shared_mlp_names(i), spec.shared_intermediate_size)
    tensors["model.norm.weight"] = norm(hidden)
    tensors["lm_head.weight"] = linear(spec.vocab_size, hidden) * 4.0  # spread logits: no near-ties in argmax
    return tensors


def _gqa_tensors(spec: ModelSpec, layer: int, linear, norm) -> dict[str, torch.Tensor]:
    p, hidden, head_dim = f"model.layers.{layer}.self_attn", spec.hidden_size, spec.head_dim
    tensors = {f"{p}.q_proj.weight": linear(spec.num_heads * head_dim, hidden),
               f"{p}.k_proj.weight": linear(spec.num_kv_heads * head_dim, hidden),
               f"{p}.v_proj.weight": linear(spec.num_kv_heads * head_dim, hidden),
               f"{p}.o_proj.weight": linear(hidden, spec.num_heads * head_dim)}
    if spec.qk_norm:
        tensors[f"{p}.q_norm.weight"], tensors[f"{p}.k_norm.weight"] = norm(head_dim), norm(head_dim)
    return tensors


def _mla_tensors(spec: ModelSpec, layer: int, linear, norm) -> dict[str, torch.Tensor]:
    mla, hidden, heads = spec.mla, spec.hidden_size, spec.num_heads
    name = lambda part: deepseek_v3.attention_name(layer, part)  # noqa: E731
    tensors = {name("kv_a_proj_with_mqa"): linear(mla.kv_lora_rank + mla.qk_rope_head_dim, hidden),
               name("kv_a_layernorm"): norm(mla.kv_lora_rank),
               name("kv_b_proj"): linear(heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank),
               name("o_proj"): linear(hidden, heads * mla.v_head_dim)}
    if mla.q_lora_rank is None:
        tensors[name("q_proj")] = linear(heads * mla.qk_head_dim, hidden)
    else:
        tensors[name("q_a_proj")] = linear(mla.q_lora_rank, hidden)
        tensors[name("q_a_layernorm")] = norm(mla.q_lora_rank)
        tensors[name("q_b_proj")] = linear(heads * mla.qk_head_dim, mla.q_lora_rank)
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
