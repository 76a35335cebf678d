"""DeepSeek-V3 (DeepseekV3ForCausalLM, also Kimi-K2): tensor names of its MLA attention, MoE and dense MLP blocks.

Its MoE layers add a score-correction bias to the router and shared experts beside the routed ones; the first
first_k_dense_replace layers are dense."""


from .qwen3_moe import dense_mlp_names, expert_names, router_name  # noqa: F401  (Qwen3-MoE's names)


def router_bias_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.e_score_correction_bias"


def shared_mlp_names(layer: int) -> tuple[str, str, str]:
    prefix = f"model.layers.{layer}.mlp.shared_experts"
    return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"


def attention_name(layer: int, part: str) -> str:
    """part: q_proj (no q LoRA), q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj,
    o_proj."""
    return f"model.layers.{layer}.self_attn.{part}.weight"
