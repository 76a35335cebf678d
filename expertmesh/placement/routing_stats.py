"""What a routing trace says about specialisation: load per expert and domain, the mutual information
between a token's domain and its chosen expert, and how concentrated each domain's routing mass is."""
from __future__ import annotations

import numpy as np

from .trace import RoutingTrace


def selection_counts(trace: RoutingTrace) -> np.ndarray:
    """[L, K, E]: how often tokens of domain K chose expert E at MoE layer L (each top-k slot counts once)."""
    layers, domains, experts = trace.expert_ids.shape[1], len(trace.domains), trace.num_experts
    counts = np.zeros((layers, domains, experts), np.int64)
    labelled = trace.domain_index >= 0
    for layer in range(layers):
        ids = trace.expert_ids[labelled, layer, :]  # [T', k]
        dom = np.repeat(trace.domain_index[labelled], ids.shape[1])
        np.add.at(counts[layer], (dom, ids.reshape(-1)), 1)
    return counts


def routing_mass(trace: RoutingTrace) -> np.ndarray:
    """[L, K, E]: summed router weights of domain K's tokens on expert E."""
    layers, domains, experts = trace.expert_ids.shape[1], len(trace.domains), trace.num_experts
    mass = np.zeros((layers, domains, experts), np.float64)
    labelled = trace.domain_index >= 0
    for layer in range(layers):
        ids = trace.expert_ids[labelled, layer, :]
        dom = np.repeat(trace.domain_index[labelled], ids.shape[1])
        np.add.at(mass[layer], (dom, ids.reshape(-1)), trace.expert_weights[labelled, layer, :].reshape(-1).astype(np.float64))
    return mass


def load_share(counts: np.ndarray) -> np.ndarray:
    """[L, E]: each expert's share of all selections at each layer (uniform = 1/E)."""
    per_expert = counts.sum(axis=1).astype(np.float64)
    return per_expert / per_expert.sum(axis=1, keepdims=True)


def mutual_information_bits(counts: np.ndarray) -> np.ndarray:
    """[L]: I(domain; chosen expert) in bits, from the joint selection counts."""
    joint = counts / counts.sum(axis=(1, 2), keepdims=True)
    p_domain = joint.sum(axis=2, keepdims=True)
    p_expert = joint.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log2(joint / (p_domain * p_expert)), 0.0)
    return terms.sum(axis=(1, 2))


def top_n_share(mass: np.ndarray, n: int = 4) -> np.ndarray:
    """[L, K]: share of domain K's routing mass held by its n heaviest experts at layer L."""
    ordered = np.sort(mass, axis=2)[:, :, ::-1]
    return ordered[:, :, :n].sum(axis=2) / np.maximum(mass.sum(axis=2), 1e-12)


def report(trace: RoutingTrace) -> dict:
    counts, mass = selection_counts(trace), routing_mass(trace)
    share = load_share(counts)
    return {
        "tokens": trace.num_tokens, "domains": trace.domains, "moe_layers": trace.moe_layers.tolist(),
        "load_share_per_layer": share.round(4).tolist(),
        "load_max_over_mean_per_layer": (share.max(axis=1) * share.shape[1]).round(3).tolist(),
        "domain_expert_share": (counts / np.maximum(counts.sum(axis=2, keepdims=True), 1)).round(4).tolist(),
        "mutual_information_bits": mutual_information_bits(counts).round(4).tolist(),
        "domain_entropy_bits": float(_entropy(counts[0].sum(axis=1))),
        "top4_share": top_n_share(mass, 4).round(4).tolist(),
    }


def _entropy(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    return float(-(p[p > 0] * np.log2(p[p > 0])).sum())


def format_report(stats: dict) -> str:
    lines = [f"{stats['tokens']} tokens; domains: {', '.join(stats['domains'])}; "
             f"H(domain) = {stats['domain_entropy_bits']:.3f} bits",
             "layer  I(domain;expert) bits  load max/mean  top-4 share per domain (" + ", ".join(stats["domains"]) + ")"]
    for i, layer in enumerate(stats["moe_layers"]):
        top4 = " ".join(f"{v:.2f}" for v in stats["top4_share"][i])
        lines.append(f"{layer:>5}  {stats['mutual_information_bits'][i]:>21.3f}  "
                     f"{stats['load_max_over_mean_per_layer'][i]:>13.2f}  {top4}")
    return "\n".join(lines)


def plot_heatmaps(trace: RoutingTrace, path: str) -> None:
    """One heatmap per MoE layer: rows are domains, columns experts, colour the domain's selection share."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'expertmesh[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = selection_counts(trace)
    share = counts / np.maximum(counts.sum(axis=2, keepdims=True), 1)
    layers = share.shape[0]
    cols = min(3, layers)
    rows = (layers + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 0.45 * len(trace.domains) * rows + 1.5 * rows),
                             squeeze=False, gridspec_kw={"hspace": 0.45})
    for i, ax in enumerate(axes.flat):
        if i >= layers:
            ax.axis("off")
            continue
        image = ax.imshow(share[i], aspect="auto", cmap="viridis", vmin=0, vmax=share.max())
        ax.set_title(f"layer {int(trace.moe_layers[i])}")
        ax.set_yticks(range(len(trace.domains)), trace.domains)
        ax.set_xticks(range(trace.num_experts))
        ax.set_xlabel("expert")
    fig.colorbar(image, ax=axes, shrink=0.6, label="share of the domain's selections")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
