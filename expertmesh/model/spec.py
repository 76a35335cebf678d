"""The model's shape, read from a Hugging Face config.json, with one architecture's quirks.

Everything downstream (layers, checkpoint loading, placement) reads `ModelSpec`; nothing else parses config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class UnsupportedModelError(ValueError):
    """The checkpoint asks for an architecture or feature expertmesh does not implement."""


SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dense_intermediate_size: int  # MLP of dense (non-MoE) layers
    expert_intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool  # renormalise the top-k router probabilities to sum to 1
    moe_layers: tuple[bool, ...]  # moe_layers[i]: layer i is sparse (experts) rather than a dense MLP
    qk_norm: bool  # RMSNorm on each head of q and k before rotary (Qwen3)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, sparse in enumerate(self.moe_layers) if sparse]

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelSpec":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {str(model_dir)!r}")
        return cls.from_hf_config(json.loads(path.read_text()))

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelSpec":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs!r}; expertmesh serves {list(SUPPORTED_ARCHITECTURES)}")
        _check_rope(cfg)
        num_layers = cfg["num_hidden_layers"]
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        common = dict(
            architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads, head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
        )
        if arch == "MixtralForCausalLM":
            if cfg.get("sliding_window") not in (None, 0) and cfg["sliding_window"] < common["max_position_embeddings"]:
                raise UnsupportedModelError(f"sliding_window={cfg['sliding_window']} is not supported")
            return cls(**common, dense_intermediate_size=cfg["intermediate_size"],
                       expert_intermediate_size=cfg["intermediate_size"],
                       num_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
                       norm_topk_prob=True, moe_layers=(True,) * num_layers, qk_norm=False)
        # Qwen3-MoE: dense layers are those in mlp_only_layers or off the decoder_sparse_step grid.
        if cfg.get("use_sliding_window"):
            raise UnsupportedModelError("use_sliding_window=true is not supported")
        num_experts = cfg["num_experts"]
        step = cfg.get("decoder_sparse_step", 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))
        return cls(**common, dense_intermediate_size=cfg["intermediate_size"],
                   expert_intermediate_size=cfg["moe_intermediate_size"], num_experts=num_experts,
                   top_k=cfg["num_experts_per_tok"], norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                   moe_layers=moe_layers, qk_norm=True)


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _check_rope(cfg: dict) -> None:
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"{key}.rope_type={rope_type!r} is not supported (only default rotary)")
