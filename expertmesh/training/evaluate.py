"""Measure a trained model per domain: loss, how its experts are used, and greedy samples.
Expert usage by domain is what semantic scheduling feeds on, so it is measured beside the loss."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from expertmesh.training.dataset import domain_windows
from expertmesh.training.model import MixtralModel


@torch.no_grad()
def domain_losses(model: MixtralModel, tokens: np.ndarray, domain_ids: np.ndarray, domains: list[str],
                  seq_len: int, batch_size: int, device: torch.device, autocast_dtype: torch.dtype,
                  max_windows: int | None = None, with_expert_usage: bool = False) -> dict:
    """Mean next-token loss per domain over non-overlapping windows; optionally the fraction of each
    domain's routed slots that each expert receives, per layer ([layer][domain][expert])."""
    was_training = model.training
    model.eval()
    shape = model.shape
    result = {"loss": {}, "tokens": {}}
    usage = torch.zeros(shape.num_hidden_layers, len(domains), shape.num_local_experts, dtype=torch.float64)
    for index, domain in enumerate(domains):
        windows = domain_windows(tokens, domain_ids, index, seq_len, max_windows)
        if len(windows) == 0:
            continue
        loss_sum, count = 0.0, 0
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
                out = model(batch[:, :-1], return_expert_indices=with_expert_usage)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            loss_sum += loss.item()
            count += batch[:, 1:].numel()
            for layer, chosen in enumerate(out.expert_indices):
                usage[layer, index] += torch.bincount(chosen.flatten(), minlength=shape.num_local_experts).cpu()
        result["loss"][domain] = loss_sum / count
        result["tokens"][domain] = count
    counted = [result["tokens"].get(d, 0) for d in domains]
    result["mean_loss"] = sum(result["loss"][d] * n for d, n in zip(domains, counted) if n) / max(sum(counted), 1)
    if with_expert_usage:
        usage = usage / usage.sum(dim=-1, keepdim=True).clamp_min(1)
        result["expert_usage"] = usage.tolist()
        result["domain_expert_mutual_information_bits"] = [domain_expert_information(u) for u in usage]
    model.train(was_training)
    return result


def domain_expert_information(usage: torch.Tensor) -> float:
    """Mutual information (bits) between a token's domain and one of its chosen experts, domains weighted
    equally: 0 when every domain uses experts alike, log2(domains) at most when experts split by domain."""
    joint = usage / usage.shape[0]  # rows are per-domain distributions over experts
    expert_marginal = joint.sum(dim=0, keepdim=True)
    domain_marginal = joint.sum(dim=1, keepdim=True)
    ratio = joint / (domain_marginal * expert_marginal).clamp_min(1e-30)
    terms = torch.where(joint > 0, joint * torch.log2(ratio.clamp_min(1e-30)), torch.zeros_like(joint))
    value = terms.sum().item()
    return 0.0 if math.isnan(value) else value


@torch.no_grad()
def greedy_continue(model: MixtralModel, prompt_ids: list[int], new_tokens: int, eos_id: int,
                    device: torch.device) -> list[int]:
    """Greedy decoding without a KV cache: the reference for what serving must reproduce, not a fast path."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt_ids], device=device)
    for _ in range(new_tokens):
        window = ids[:, -model.shape.max_position_embeddings:]
        next_id = model(window).logits[0, -1].float().argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        if next_id.item() == eos_id:
            break
    model.train(was_training)
    return ids[0, len(prompt_ids):].tolist()
