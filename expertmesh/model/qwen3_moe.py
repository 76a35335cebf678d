"""Qwen3-MoE (Qwen3MoeForCausalLM): tensor names of its MoE and dense MLP blocks.

Its attention adds per-head RMSNorm on q and k (q_norm, k_norm); dense layers come from mlp_only_layers."""


def router_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"


def dense_mlp_names(layer: int) -> tuple[str, str, str]:
    prefix = f"model.layers.{layer}.mlp"
    return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"
