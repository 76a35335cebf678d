"""Loads the two halves of a model: the attention side (everything but experts) and a set of experts.

The attention side is what an attention node holds; `load_experts` reads only the (layer, expert) pairs
that the placement gives one expert node."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..ops.fused_moe import StackedExperts
from . import mixtral, qwen3_moe
from .checkpoint import Checkpoint
from .spec import ModelSpec


def names_of(spec: ModelSpec) -> ModuleType:
    return mixtral if spec.architecture == "MixtralForCausalLM" else qwen3_moe


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv_proj: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]: q, k and v in one matmul
    o_proj: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_attention_norm: torch.Tensor
    router: torch.Tensor | None  # [num_experts, hidden] on MoE layers
    dense_mlp: tuple[torch.Tensor, torch.Tensor] | None  # (gate_up [2 * inter, hidden], down) on dense layers


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
    hidden, head_dim = spec.hidden_size, spec.head_dim

    def get(name: str, *shape: int) -> torch.Tensor:
        return ckpt.get(name, shape, dtype, device)

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        dense = None
        if not spec.moe_layers[i]:
            gate, up, down = names.dense_mlp_names(i)
            inter = spec.dense_intermediate_size
            dense = (torch.cat([get(gate, inter, hidden), get(up, inter, hidden)]), get(down, hidden, inter))
        layers.append(LayerWeights(
            input_norm=get(f"{p}.input_layernorm.weight", hidden),
            qkv_proj=torch.cat([get(f"{p}.self_attn.q_proj.weight", spec.num_heads * head_dim, hidden),
                                get(f"{p}.self_attn.k_proj.weight", spec.num_kv_heads * head_dim, hidden),
                                get(f"{p}.self_attn.v_proj.weight", spec.num_kv_heads * head_dim, hidden)]),
            o_proj=get(f"{p}.self_attn.o_proj.weight", hidden, spec.num_heads * head_dim),
            q_norm=get(f"{p}.self_attn.q_norm.weight", head_dim) if spec.qk_norm else None,
            k_norm=get(f"{p}.self_attn.k_norm.weight", head_dim) if spec.qk_norm else None,
            post_attention_norm=get(f"{p}.post_attention_layernorm.weight", hidden),
            router=get(names.router_name(i), spec.num_experts, hidden) if spec.moe_layers[i] else None,
            dense_mlp=dense,
        ))
    embed = get("model.embed_tokens.weight", spec.vocab_size, hidden)
    if spec.tie_word_embeddings and "lm_head.weight" not in ckpt:
        lm_head = embed
    else:
        lm_head = get("lm_head.weight", spec.vocab_size, hidden)
    return AttentionSideWeights(embed_tokens=embed, layers=layers, final_norm=get("model.norm.weight", hidden),
                                lm_head=lm_head)


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
