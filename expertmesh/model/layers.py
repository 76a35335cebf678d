"""The layers of a MoE transformer as plain functions: tensors in, tensors out, no hidden state.

Attention reads and writes a paged KV cache through the step's metadata (kv/metadata.py), so prefill and decode
of any mix of sequences run through one code path; the ops (ops/) pick a GPU kernel or the torch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kv.metadata import StepMetadata
from ..ops.attention import paged_attention
from ..ops.mla import mla_attention as paged_mla_attention, write_latent
from ..ops.norm import rms_norm
from ..ops.rotary import rotate_and_write_kv
from ..ops.router import route, route_grouped
from .rotary import RotaryTable, yarn_mscale
from .spec import ModelSpec
from .weights import GQAWeights, LayerWeights, MLAWeights


def self_attention(w: LayerWeights, x: torch.Tensor, meta: StepMetadata, rotary: RotaryTable,
                   caches: tuple[torch.Tensor, ...], spec: ModelSpec) -> torch.Tensor:
    """The layer's attention of x over its caches (kv/cache.py: (keys, values), or MLA's (latents,))."""
    if spec.mla is not None:
        return mla_attention(w.attention, x, meta, rotary, caches[0], spec)
    return attention(w.attention, x, meta, rotary, *caches, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                     spec.rms_norm_eps)


def route_and_share(w: LayerWeights, x: torch.Tensor, h: torch.Tensor,
                    spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MoE layer's part on the attention node: (expert ids, weights) of each token of x, and the residual stream h
    with the shared experts' output added (DeepSeek), before the routed sum joins it.

    The shared experts run here, beside the router, because every token uses them. On an expert node they would add
    a message to every token (DeepSeek-V3 with its 8 groups on 8 nodes: 5 destinations instead of at most 4, see
    `simulate --shape deepseek_v3`) and the whole batch to that node's load, or, replicated on every node, 88 MB of
    bf16 weights per layer to each. Here a decode step reads those 88 MB once for the whole batch, beside 374 MB of
    MLA weights and the batch's latents (`bench layer --shapes deepseek_v3` times the part and them alone)."""
    expert_ids, expert_weights = route_tokens(w, x, spec)
    if w.shared_mlp is not None:
        h = h + swiglu(x, *w.shared_mlp)
    return expert_ids, expert_weights, h


def attention(w: GQAWeights, x: torch.Tensor, meta: StepMetadata, rotary: RotaryTable, k_cache: torch.Tensor,
              v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, eps: float) -> torch.Tensor:
    """Self-attention of x ([tokens, hidden]) over the paged KV cache ([blocks, block_size, kv_heads, head_dim]):
    q/k norms, rotary and the KV write in one op, then every sequence attends causally to its whole context."""
    q = rotate_and_write_kv(x @ w.qkv_proj.T, meta.positions, rotary.cos, rotary.sin, k_cache, v_cache,
                            meta.slot_mapping, num_heads, num_kv_heads, w.q_norm, w.k_norm, eps)
    out = paged_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.query_start, meta.max_query_len,
                          head_dim ** -0.5)
    return out.reshape(x.shape[0], num_heads * head_dim) @ w.o_proj.T


def mla_attention(w: MLAWeights, x: torch.Tensor, meta: StepMetadata, rotary: RotaryTable, cache: torch.Tensor,
                  spec: ModelSpec) -> torch.Tensor:
    """DeepSeek's multi-head latent attention of x ([tokens, hidden]) over the paged latent cache
    ([blocks, block_size, 1, kv_lora_rank + rope_dim]): q through its low-rank pair, the kv latent (normed) and the
    rotated rope key into the cache, then attention (ops/mla.py: absorbed at decode, expanded with prefill)."""
    mla, tokens, eps = spec.mla, x.shape[0], spec.rms_norm_eps
    q = x @ w.q_proj.T if w.q_proj is not None else rms_norm(x @ w.q_a_proj.T, w.q_a_norm, eps) @ w.q_b_proj.T
    q_nope, q_rope = q.view(tokens, spec.num_heads, mla.qk_head_dim).split([mla.qk_nope_head_dim,
                                                                           mla.qk_rope_head_dim], dim=-1)
    latent, rope_key = (x @ w.kv_a_proj.T).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
    write_latent(rms_norm(latent, w.kv_a_norm, eps), rotary.apply(rope_key.unsqueeze(1), meta.positions)[:, 0],
                 cache, meta.slot_mapping)
    out = paged_mla_attention(q_nope, rotary.apply(q_rope, meta.positions), cache, w.kv_b_proj, meta.block_table,
                              meta.seq_lens, meta.query_start, meta.max_query_len, mla_scale(spec))
    return out.reshape(tokens, spec.num_heads * mla.v_head_dim) @ w.o_proj.T


def mla_scale(spec: ModelSpec) -> float:
    """qk_head_dim ** -0.5, times YaRN's mscale squared when rope_parameters set mscale_all_dim (DeepSeek-V3)."""
    scale = spec.mla.qk_head_dim ** -0.5
    if spec.rope.rope_type != "default" and spec.rope.mscale_all_dim:
        scale *= yarn_mscale(spec.rope.factor, spec.rope.mscale_all_dim) ** 2
    return scale


def route_tokens(w: LayerWeights, x: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [tokens, k] int32, weights [tokens, k] float32) of a MoE layer: softmax top-k (Mixtral, Qwen3) or
    DeepSeek's sigmoid scores chosen by group with the correction bias, scaled by routed_scaling_factor."""
    if spec.scoring == "softmax":
        return route(x, w.router, spec.top_k, spec.norm_topk_prob)
    return route_grouped(x, w.router, w.router_bias, spec.top_k, spec.num_expert_groups, spec.top_groups,
                         spec.norm_topk_prob, spec.routed_scaling_factor)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU MLP with gate and up stacked in one weight ([2 * inter, hidden])."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T
