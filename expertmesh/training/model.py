"""The Mixtral architecture in plain PyTorch, for training: same function as transformers' MixtralForCausalLM.
RMSNorm, rotary, GQA attention with causal SDPA, softmax router -> top-k -> renormalise, SwiGLU experts."""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MixtralShape:
    """Hyperparameters of one Mixtral model; names follow the Hugging Face config.json keys."""
    vocab_size: int = 6144
    hidden_size: int = 256
    intermediate_size: int = 96  # per expert
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} heads not divisible by "
                             f"{self.num_key_value_heads} key/value heads")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} outside 1..{self.num_local_experts}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelOutput:
    logits: torch.Tensor                 # [batch, seq, vocab]
    aux_loss: torch.Tensor               # load-balancing loss, mean over layers; 1.0 when perfectly balanced
    expert_indices: list[torch.Tensor] = field(default_factory=list)  # per layer [batch*seq, top_k]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even under bf16 autocast, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)  # the half-split layout of the Hugging Face checkpoints
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, shape: MixtralShape):
        super().__init__()
        self.shape = shape
        hd = shape.head_dim
        self.q_proj = nn.Linear(shape.hidden_size, shape.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(shape.hidden_size, shape.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(shape.hidden_size, shape.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(shape.num_attention_heads * hd, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        hd, heads, kv_heads = self.shape.head_dim, self.shape.num_attention_heads, self.shape.num_key_value_heads
        q = self.q_proj(x).view(batch, seq, heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, kv_heads, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Query head h reads key/value head h // (heads / kv_heads), as transformers' repeat_kv does.
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, heads * hd))


class SparseMoE(nn.Module):
    """Router plus experts. Expert weights are stacked [experts, ...] so that all experts run as one matmul.

    Every expert is evaluated on every token and multiplied by its gate, which is zero outside the token's
    top-k: the same function and the same gradients as Mixtral's dispatch (unchosen experts get none), and
    for a model this small two dense matmuls are faster than sixteen ragged ones. Serving dispatches sparsely.
    """

    def __init__(self, shape: MixtralShape):
        super().__init__()
        self.top_k = shape.num_experts_per_tok
        experts, hidden, inner = shape.num_local_experts, shape.hidden_size, shape.intermediate_size
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(experts, inner, hidden))  # gate projection
        self.w3 = nn.Parameter(torch.empty(experts, inner, hidden))  # up projection
        self.w2 = nn.Parameter(torch.empty(experts, hidden, inner))  # down projection

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities [tokens, experts] (float32), top-k indices and their renormalised weights."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        top_weights, top_indices = torch.topk(probs, self.top_k, dim=-1)
        return probs, top_indices, top_weights / top_weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, hidden = x.shape
        experts, inner, _ = self.w1.shape
        probs, top_indices, top_weights = self.route(x)
        gates = torch.zeros_like(probs).scatter(1, top_indices, top_weights)  # [tokens, experts]
        gate_proj = x @ self.w1.reshape(experts * inner, hidden).t()
        up_proj = x @ self.w3.reshape(experts * inner, hidden).t()
        activated = (F.silu(gate_proj) * up_proj).view(tokens, experts, inner)
        weighted = (activated * gates.to(activated.dtype)[:, :, None]).view(tokens, experts * inner)
        out = weighted @ self.w2.permute(0, 2, 1).reshape(experts * inner, hidden)
        return out, probs, top_indices


def load_balancing_loss(probs: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: experts * sum_e(fraction routed to e * mean probability of e).
    Equals 1.0 when routing is uniform; grows as a few experts take most tokens."""
    experts = probs.shape[-1]
    routed = F.one_hot(top_indices, experts).float().sum(dim=1)  # [tokens, experts]
    fraction_routed = routed.mean(dim=0) / top_indices.shape[-1]
    return experts * (fraction_routed * probs.mean(dim=0)).sum()


class DecoderLayer(nn.Module):
    def __init__(self, shape: MixtralShape, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(shape)

    def forward(self, x, cos, sin):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin))
        batch, seq, hidden = x.shape
        moe_out, probs, top_indices = self.block_sparse_moe(self.post_attention_layernorm(x).view(-1, hidden))
        return x + self.dropout(moe_out.view(batch, seq, hidden)), probs, top_indices


class MixtralModel(nn.Module):
    """Parameter names mirror the Hugging Face checkpoint (model.layers.{i}.self_attn.q_proj, ...).
    Residual dropout regularises training only; it has no weights, so the checkpoint stays plain Mixtral."""

    def __init__(self, shape: MixtralShape, dropout: float = 0.0):
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape, dropout) for _ in range(shape.num_hidden_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.shape.initializer_range
        # Projections that write into the residual stream start smaller so its variance stays flat in depth.
        residual_std = std / math.sqrt(2 * self.shape.num_hidden_layers)
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            elif name.endswith(("o_proj.weight", ".w2")):
                param.normal_(0.0, residual_std)
            else:
                param.normal_(0.0, std)

    def forward(self, input_ids: torch.Tensor, return_expert_indices: bool = False) -> ModelOutput:
        seq = input_ids.shape[1]
        if seq > self.shape.max_position_embeddings:
            raise ValueError(f"sequence of {seq} tokens exceeds max_position_embeddings "
                             f"{self.shape.max_position_embeddings}")
        cos, sin = rotary_cos_sin(seq, self.shape.head_dim, self.shape.rope_theta, input_ids.device)
        x = self.embed_tokens(input_ids)
        aux_losses, expert_indices = [], []
        for layer in self.layers:
            x, probs, top_indices = layer(x, cos, sin)
            aux_losses.append(load_balancing_loss(probs, top_indices))
            if return_expert_indices:
                expert_indices.append(top_indices)
        logits = self.lm_head(self.norm(x))
        return ModelOutput(logits=logits, aux_loss=torch.stack(aux_losses).mean(), expert_indices=expert_indices)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
