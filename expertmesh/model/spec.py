"""The model's shape, read from a Hugging Face config.json as transformers reads it, old and new field names alike.

Everything downstream (layers, checkpoint loading, placement) reads `ModelSpec`; nothing else parses config.json.
What expertmesh does not implement is refused here, with the field that asks for it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class UnsupportedModelError(ValueError):
    """The checkpoint asks for an architecture or feature expertmesh does not implement, or its config lacks a field."""


SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM")

# transformers 5 renamed some fields and keeps the old names readable (attribute_map, rope standardisation);
# a config.json may carry either. First present wins.
_ALIASES = {
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "rope": ("rope_parameters", "rope_scaling"),
}

# What each transformers config class assumes for a field the file leaves out (MixtralConfig, Qwen3MoeConfig,
# DeepseekV3Config in transformers 5.24).
_DEFAULTS = {
    "MixtralForCausalLM": dict(rms_norm_eps=1e-5, max_position_embeddings=4096 * 32, rope_theta=1e6,
                               intermediate_size=14336, num_key_value_heads=8, bos_token_id=1, eos_token_id=2),
    "Qwen3MoeForCausalLM": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=10000.0,
                                intermediate_size=6144, moe_intermediate_size=768, num_key_value_heads=4,
                                norm_topk_prob=False, decoder_sparse_step=1),
    "DeepseekV3ForCausalLM": dict(
        rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=10000.0, rope_interleave=True, bos_token_id=0,
        eos_token_id=1,
        intermediate_size=18432, moe_intermediate_size=2048, n_shared_experts=1, routed_scaling_factor=2.5,
        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
        topk_group=4, first_k_dense_replace=3, norm_topk_prob=True),
}


@dataclass(frozen=True)
class Rope:
    """Rotary embedding as transformers' modeling_rope_utils computes it: "default" or "yarn"."""
    theta: float
    rope_type: str = "default"
    factor: float = 1.0  # yarn: context extension factor
    original_max_position_embeddings: int = 0  # yarn: the pretraining context
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # yarn: cos/sin scale; None: derived from factor and mscale
    truncate: bool = True
    interleave: bool = False  # DeepSeek: rotary pairs are (x0, x1), (x2, x3), ... rather than the two halves


@dataclass(frozen=True)
class MLA:
    """DeepSeek's multi-head latent attention: q and kv through low-rank projections; each head's q and k are a
    no-position part (nope) and a rotary part (rope); the cache holds the kv latent and one shared rope key."""
    q_lora_rank: int | None  # None: q is one full projection (q_proj)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # MLA: 1 (the latent is shared by every head)
    head_dim: int  # MLA: qk_rope_head_dim, the rotary dimension (transformers sets config.head_dim so too)
    dense_intermediate_size: int  # MLP of dense (non-MoE) layers
    expert_intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool  # renormalise the top-k router weights to sum to 1
    moe_layers: tuple[bool, ...]  # moe_layers[i]: layer i is sparse (experts) rather than a dense MLP
    qk_norm: bool  # RMSNorm on each head of q and k before rotary (Qwen3)
    rms_norm_eps: float
    rope: Rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # DeepSeek-V3 routing: sigmoid scores, a bias that only chooses, top groups first, a scale on the weights
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    num_expert_groups: int = 1
    top_groups: int = 1
    routed_scaling_factor: float = 1.0
    shared_intermediate_size: int = 0  # shared experts of every MoE layer, as one MLP (0: none)
    mla: MLA | None = None

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, sparse in enumerate(self.moe_layers) if sparse]

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

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
        _refuse_unsupported(cfg)
        cfg = {**_DEFAULTS[arch], **cfg}
        max_len = cfg["max_position_embeddings"]
        rope = _rope(cfg, max_len, interleave=arch == "DeepseekV3ForCausalLM" and cfg["rope_interleave"])
        num_layers, num_heads, hidden = (_need(cfg, name) for name in ("num_hidden_layers", "num_attention_heads",
                                                                       "hidden_size"))
        eos = cfg.get("eos_token_id")
        common = dict(
            architecture=arch, vocab_size=_need(cfg, "vocab_size"), hidden_size=hidden, num_layers=num_layers,
            num_heads=num_heads, num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads, rms_norm_eps=cfg["rms_norm_eps"],
            rope=rope, max_position_embeddings=max_len,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            num_experts=_need(cfg, "num_experts"), top_k=_need(cfg, "num_experts_per_tok"),
        )
        if arch == "MixtralForCausalLM":
            window = cfg.get("sliding_window")
            if window not in (None, 0) and window < max_len:
                raise UnsupportedModelError(f"sliding_window={window} is not supported")
            return cls(**common, dense_intermediate_size=_need(cfg, "intermediate_size"),
                       expert_intermediate_size=_need(cfg, "intermediate_size"), norm_topk_prob=True,
                       moe_layers=(True,) * num_layers, qk_norm=False)
        if arch == "Qwen3MoeForCausalLM":
            return _qwen3_moe(cls, cfg, common)
        return _deepseek_v3(cls, cfg, common)


def _qwen3_moe(cls, cfg: dict, common: dict) -> ModelSpec:
    """Dense layers are those in mlp_only_layers or off the decoder_sparse_step grid."""
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError("use_sliding_window=true is not supported")
    step = cfg["decoder_sparse_step"]
    dense = set(cfg.get("mlp_only_layers") or [])
    moe_layers = tuple(i not in dense and common["num_experts"] > 0 and (i + 1) % step == 0
                       for i in range(common["num_layers"]))
    return cls(**common, dense_intermediate_size=_need(cfg, "intermediate_size"),
               expert_intermediate_size=_need(cfg, "moe_intermediate_size"),
               norm_topk_prob=bool(cfg["norm_topk_prob"]), moe_layers=moe_layers, qk_norm=True)


def _deepseek_v3(cls, cfg: dict, common: dict) -> ModelSpec:
    """transformers' DeepseekV3: MLA, dense layers before first_k_dense_replace, shared experts, sigmoid routing
    with a score-correction bias over groups of experts."""
    for field, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if cfg.get(field, expected) != expected:
            raise UnsupportedModelError(f"{field}={cfg[field]!r} is not supported (DeepseekV3 in transformers "
                                        f"computes {field}={expected!r})")
    mla = MLA(q_lora_rank=cfg["q_lora_rank"], kv_lora_rank=cfg["kv_lora_rank"],
              qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
              v_head_dim=cfg["v_head_dim"])
    num_experts, groups, top_groups = common["num_experts"], cfg["n_group"] or 1, cfg["topk_group"] or 1
    if num_experts % groups or top_groups > groups or common["top_k"] > top_groups * (num_experts // groups):
        raise UnsupportedModelError(f"n_group={groups}, topk_group={top_groups}: the top {common['top_k']} of "
                                    f"{num_experts} routed experts cannot be chosen within the best groups")
    first_sparse = cfg["first_k_dense_replace"] or 0
    common = {**common, "num_kv_heads": 1, "head_dim": mla.qk_rope_head_dim}
    return cls(**common, dense_intermediate_size=cfg["intermediate_size"],
               expert_intermediate_size=cfg["moe_intermediate_size"], norm_topk_prob=bool(cfg["norm_topk_prob"]),
               moe_layers=tuple(i >= first_sparse for i in range(common["num_layers"])), qk_norm=False,
               scoring="sigmoid", num_expert_groups=groups, top_groups=top_groups,
               routed_scaling_factor=float(cfg["routed_scaling_factor"]),
               shared_intermediate_size=cfg["moe_intermediate_size"] * (cfg["n_shared_experts"] or 0), mla=mla)


def _need(cfg: dict, name: str):
    """A required field under any of its names."""
    for key in _ALIASES.get(name, (name,)):
        if cfg.get(key) is not None:
            return cfg[key]
    raise UnsupportedModelError(f"config.json has no {' / '.join(_ALIASES.get(name, (name,)))}")


def _refuse_unsupported(cfg: dict) -> None:
    quantization = cfg.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise UnsupportedModelError(f"quantization_config.quant_method={method!r} is not supported: expertmesh "
                                    f"loads unquantized weights (convert the checkpoint to bf16 first)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act={cfg['hidden_act']!r} is not supported (only silu)")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            raise UnsupportedModelError(f"{field}=true is not supported")


def _rope(cfg: dict, max_position_embeddings: int, interleave: bool) -> Rope:
    """rope_parameters (transformers 5) or rope_scaling + rope_theta (older configs), standardised as
    transformers' RotaryEmbeddingConfigMixin does; refuses the rotary variants expertmesh does not compute."""
    key = next((k for k in _ALIASES["rope"] if cfg.get(k)), None)
    params = dict(cfg[key]) if key else {}
    if any(isinstance(value, dict) for value in params.values()):
        raise UnsupportedModelError(f"{key} per layer type is not supported")
    theta = float(params.get("rope_theta") or cfg["rope_theta"] or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported")
    if rope_type == "default":
        return Rope(theta=theta, interleave=interleave)
    if rope_type != "yarn":
        raise UnsupportedModelError(f"{key}.rope_type={rope_type!r} is not supported (default or yarn rotary)")
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    factor = params.get("factor") or max_position_embeddings / original
    return Rope(theta=theta, rope_type="yarn", factor=float(factor), original_max_position_embeddings=int(original),
                beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)),
                interleave=interleave)
