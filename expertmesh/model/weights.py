"""Loads the two halves of a model: the attention side (everything but experts) and a set of experts.

The attention side is what an attention node holds; `load_experts` reads only the (layer, expert) pairs
that the placement gives one expert node."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..ops.fused_moe import StackedExperts
from . import deepseek_v3, mixtral, qwen3_moe
from .checkpoint import Checkpoint
from .spec import ModelSpec


def names_of(spec: ModelSpec) -> ModuleType:
    return {"MixtralForCausalLM": mixtral, "Qwen3MoeForCausalLM": qwen3_moe,
            "DeepseekV3ForCausalLM": deepseek_v3}[spec.architecture]


@dataclass
class GQAWeights:
    """Grouped-query attention (Mixtral, Qwen3): Llama's tensor names."""
    qkv_proj: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]: q, k and v in one matmul
    o_proj: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm of each head of q and k
    k_norm: torch.Tensor | None


@dataclass
class MLAWeights:
    """Multi-head latent attention (DeepSeek-V3): q through a low-rank pair (or one q_proj), kv through a latent."""
    q_proj: torch.Tensor | None  # [heads * qk_head_dim, hidden] when q_lora_rank is None
    q_a_proj: torch.Tensor | None  # [q_lora_rank, hidden]
    q_a_norm: torch.Tensor | None
    q_b_proj: torch.Tensor | None  # [heads * qk_head_dim, q_lora_rank]
    kv_a_proj: torch.Tensor  # [kv_lora_rank + rope_dim, hidden]: the latent and the shared rope key
    kv_a_norm: torch.Tensor
    kv_b_proj: torch.Tensor  # [heads * (nope + v_dim), kv_lora_rank]
    o_proj: torch.Tensor  # [hidden, heads * v_dim]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    attention: GQAWeights | MLAWeights
    post_attention_norm: torch.Tensor
    router: torch.Tensor | None  # [num_experts, hidden] on MoE layers (float32 for DeepSeek, as transformers keeps it)
    router_bias: torch.Tensor | None  # DeepSeek: e_score_correction_bias [num_experts] float32, for choosing only
    dense_mlp: tuple[torch.Tensor, torch.Tensor] | None  # (gate_up [2 * inter, hidden], down) on dense layers
    shared_mlp: tuple[torch.Tensor, torch.Tensor] | None  # DeepSeek's shared experts on MoE layers, as dense_mlp


@dataclass
class AttentionSideWeights:
    embed_tokens: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor


def load_attention_side(model_dir: str | Path, spec: ModelSpec, dtype: torch.dtype,
                        device: str = "cpu") -> AttentionSideWeights:
    ckpt = Checkpoint(model_dir)
    names = names_of(spec)
    hidden = spec.hidden_size

    def get(name: str, *shape: int, as_dtype: torch.dtype = dtype) -> torch.Tensor:
        return ckpt.get(name, shape, as_dtype, device)

    def mlp(gate_up_down: tuple[str, str, str], inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up, down = gate_up_down
        return torch.cat([get(gate, inter, hidden), get(up, inter, hidden)]), get(down, hidden, inter)

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        sparse = spec.moe_layers[i]
        router_dtype = torch.float32 if spec.mla is not None else dtype
        layers.append(LayerWeights(
            input_norm=get(f"{p}.input_layernorm.weight", hidden),
            attention=_mla_weights(get, spec, i) if spec.mla is not None else _gqa_weights(get, spec, i),
            post_attention_norm=get(f"{p}.post_attention_layernorm.weight", hidden),
            router=get(names.router_name(i), spec.num_experts, hidden, as_dtype=router_dtype) if sparse else None,
            router_bias=(get(names.router_bias_name(i), spec.num_experts, as_dtype=torch.float32)
                         if sparse and spec.scoring == "sigmoid" else None),
            dense_mlp=None if sparse else mlp(names.dense_mlp_names(i), spec.dense_intermediate_size),
            shared_mlp=(mlp(names.shared_mlp_names(i), spec.shared_intermediate_size)
                        if sparse and spec.shared_intermediate_size else None),
        ))
    embed = get("model.embed_tokens.weight", spec.vocab_size, hidden)
    if spec.tie_word_embeddings and "lm_head.weight" not in ckpt:
        lm_head = embed
    else:
        lm_head = get("lm_head.weight", spec.vocab_size, hidden)
    return AttentionSideWeights(embed_tokens=embed, layers=layers, final_norm=get("model.norm.weight", hidden),
                                lm_head=lm_head)


def _gqa_weights(get, spec: ModelSpec, layer: int) -> GQAWeights:
    p, hidden, head_dim = f"model.layers.{layer}.self_attn", spec.hidden_size, spec.head_dim
    return GQAWeights(
        qkv_proj=torch.cat([get(f"{p}.q_proj.weight", spec.num_heads * head_dim, hidden),
                            get(f"{p}.k_proj.weight", spec.num_kv_heads * head_dim, hidden),
                            get(f"{p}.v_proj.weight", spec.num_kv_heads * head_dim, hidden)]),
        o_proj=get(f"{p}.o_proj.weight", hidden, spec.num_heads * head_dim),
        q_norm=get(f"{p}.q_norm.weight", head_dim) if spec.qk_norm else None,
        k_norm=get(f"{p}.k_norm.weight", head_dim) if spec.qk_norm else None)


def _mla_weights(get, spec: ModelSpec, layer: int) -> MLAWeights:
    mla, hidden, heads = spec.mla, spec.hidden_size, spec.num_heads
    name = lambda part: deepseek_v3.attention_name(layer, part)  # noqa: E731
    q_rank = mla.q_lora_rank
    return MLAWeights(
        q_proj=get(name("q_proj"), heads * mla.qk_head_dim, hidden) if q_rank is None else None,
        q_a_proj=get(name("q_a_proj"), q_rank, hidden) if q_rank is not None else None,
        q_a_norm=get(name("q_a_layernorm"), q_rank) if q_rank is not None else None,
        q_b_proj=get(name("q_b_proj"), heads * mla.qk_head_dim, q_rank) if q_rank is not None else None,
        kv_a_proj=get(name("kv_a_proj_with_mqa"), mla.kv_lora_rank + mla.qk_rope_head_dim, hidden),
        kv_a_norm=get(name("kv_a_layernorm"), mla.kv_lora_rank),
        kv_b_proj=get(name("kv_b_proj"), heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank),
        o_proj=get(name("o_proj"), hidden, heads * mla.v_head_dim))


def load_experts(model_dir: str | Path, spec: ModelSpec, pairs: list[tuple[int, int]], dtype: torch.dtype,
                 device: str = "cpu") -> dict[int, StackedExperts]:
    """The experts named by (layer, expert) pairs, stacked per layer in increasing expert id. Each checkpoint
    tensor is read on its own and copied into its place in the preallocated stacks: no second copy of the
    experts is ever held."""
    ckpt = Checkpoint(model_dir)
    names = names_of(spec)
    hidden, inter = spec.hidden_size, spec.expert_intermediate_size
    held: dict[int, set[int]] = {}
    for layer, expert in pairs:
        if not (0 <= layer < spec.num_layers and spec.moe_layers[layer] and 0 <= expert < spec.num_experts):
            raise ValueError(f"(layer {layer}, expert {expert}) is not an expert of this model")
        held.setdefault(layer, set()).add(expert)
    stacks = {}
    for layer in sorted(held):
        stacked = StackedExperts.empty(sorted(held[layer]), spec.num_experts, hidden, inter, dtype, device)
        for row, expert in enumerate(stacked.expert_ids):
            gate, up, down = names.expert_names(layer, expert)
            stacked.gate_up[row, :inter].copy_(ckpt.get(gate, (inter, hidden), dtype))
            stacked.gate_up[row, inter:].copy_(ckpt.get(up, (inter, hidden), dtype))
            stacked.down[row].copy_(ckpt.get(down, (hidden, inter), dtype))
        stacks[layer] = stacked
    return stacks
