"""Named shapes of released MoE models, as ModelSpecs read from the fields of their published config.json: what
`bench layer` times one layer of and `simulate` costs messages and compute with, without a checkpoint at hand."""
from __future__ import annotations

from .spec import ModelSpec


def _spec(arch: str, **fields) -> ModelSpec:
    return ModelSpec.from_hf_config({"architectures": [arch], **fields})


SHAPES: dict[str, tuple[str, ModelSpec]] = {
    "mixtral": ("Mixtral-8x7B", _spec(
        "MixtralForCausalLM", vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6)),
    "qwen3": ("Qwen3-30B-A3B", _spec(
        "Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e6)),
    "mixtral_8x22b": ("Mixtral-8x22B", _spec(
        "MixtralForCausalLM", vocab_size=32768, hidden_size=6144, num_hidden_layers=56, num_attention_heads=48,
        num_key_value_heads=8, intermediate_size=16384, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
        max_position_embeddings=65536)),
    "qwen3_235b": ("Qwen3-235B-A22B", _spec(
        "Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
        num_key_value_heads=4, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e6, max_position_embeddings=40960)),
    # 256 routed experts of 2048 + 1 shared, top 8 within the best 4 of 8 groups, MLA (q LoRA 1536, kv latent 512,
    # 128 heads of 128 nope + 64 rope for q.k and 128 for v), 3 dense layers first
    "deepseek_v3": ("DeepSeek-V3", _spec(
        "DeepseekV3ForCausalLM", vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=2.5,
        max_position_embeddings=163840, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # small shapes for --device cpu
    "tiny": ("tiny", _spec(
        "MixtralForCausalLM", vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, intermediate_size=384, num_local_experts=16, num_experts_per_tok=2)),
    "tiny_mla": ("tiny-MLA", _spec(
        "DeepseekV3ForCausalLM", vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
        intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, first_k_dense_replace=1, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32)),
}


def shape(name: str) -> tuple[str, ModelSpec]:
    """(display name, spec) of a named shape."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {sorted(SHAPES)}")
    return SHAPES[name]
