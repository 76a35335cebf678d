"""Mixtral (MixtralForCausalLM): tensor names of its MoE blocks in Hugging Face checkpoints.

Attention, norms and embeddings share the Llama names (see weights.py); every layer is sparse."""


def router_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """(gate, up, down) projections; Mixtral calls them w1, w3, w2."""
    prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return f"{prefix}.w1.weight", f"{prefix}.w3.weight", f"{prefix}.w2.weight"


def dense_mlp_names(layer: int) -> tuple[str, str, str]:
    raise ValueError(f"Mixtral has no dense MLP layers (asked for layer {layer})")
