"""Save and load the training model as a Hugging Face Mixtral checkpoint (hub tensor names, bf16 safetensors).
Shards above a size limit, with model.safetensors.index.json, so every file stays small enough to move."""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from expertmesh.training.model import MixtralModel, MixtralShape

_EXPERT_SUFFIXES = ("w1", "w2", "w3")


def to_hf_state_dict(model: MixtralModel, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Our stacked expert tensors become one tensor per expert under Mixtral's hub names."""
    hf = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", dtype)
        prefix, _, suffix = name.rpartition(".")
        if name.startswith("layers.") and suffix in _EXPERT_SUFFIXES:
            for expert, weight in enumerate(tensor):
                hf[f"model.{prefix}.experts.{expert}.{suffix}.weight"] = weight.contiguous()
        elif name.startswith("lm_head."):
            hf[name] = tensor.contiguous()
        else:
            hf[f"model.{name}"] = tensor.contiguous()
    return hf


def from_hf_state_dict(hf: dict[str, torch.Tensor], shape: MixtralShape) -> dict[str, torch.Tensor]:
    ours = {}
    for name, tensor in hf.items():
        if ".experts." in name:
            continue
        ours[name.removeprefix("model.")] = tensor
    for layer in range(shape.num_hidden_layers):
        for suffix in _EXPERT_SUFFIXES:
            prefix = f"model.layers.{layer}.block_sparse_moe.experts"
            ours[f"layers.{layer}.block_sparse_moe.{suffix}"] = torch.stack(
                [hf[f"{prefix}.{e}.{suffix}.weight"] for e in range(shape.num_local_experts)])
    return ours


def hf_config(shape: MixtralShape, dtype: str = "bfloat16") -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "num_local_experts": shape.num_local_experts,
        "num_experts_per_tok": shape.num_experts_per_tok,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_theta": shape.rope_theta,
        "rms_norm_eps": shape.rms_norm_eps,
        "initializer_range": shape.initializer_range,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": shape.bos_token_id,
        "eos_token_id": shape.eos_token_id,
        "torch_dtype": dtype,
    }


def shape_from_config(config: dict) -> MixtralShape:
    if config.get("model_type") != "mixtral":
        raise ValueError(f"model_type {config.get('model_type')!r} is not 'mixtral'")
    rope_theta = config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 1e6)
    fields = {k: config[k] for k in MixtralShape.__dataclass_fields__ if k in config and k != "rope_theta"}
    return MixtralShape(**fields, rope_theta=rope_theta)


def write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None) -> list[str]:
    """One model.safetensors, or numbered shards plus model.safetensors.index.json when over max_shard_bytes."""
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    max_shard_bytes = max_shard_bytes or sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    metadata = {"format": "pt"}
    if len(shards) == 1:
        names = ["model.safetensors"]
        save_file(shards[0], str(out / names[0]), metadata=metadata)
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards):
            save_file(shard, str(out / name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def save_checkpoint(model: MixtralModel, out: Path, max_shard_bytes: int | None = 15_000_000,
                    dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Write weights, config.json and generation_config.json; returns the weight file names."""
    out.mkdir(parents=True, exist_ok=True)
    names = write_weights(to_hf_state_dict(model, dtype), out, max_shard_bytes)
    dtype_name = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_config(model.shape, dtype_name), indent=2) + "\n")
    generation = {"bos_token_id": model.shape.bos_token_id, "eos_token_id": model.shape.eos_token_id,
                  "do_sample": False, "max_new_tokens": 128}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return names


def load_checkpoint(folder: Path, dtype: torch.dtype = torch.float32) -> MixtralModel:
    """Read a checkpoint written by save_checkpoint (or any hub-named Mixtral) into the training model."""
    shape = shape_from_config(json.loads((folder / "config.json").read_text()))
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {folder}")
    hf = {}
    for file in files:
        hf.update(load_file(str(file)))
    model = MixtralModel(shape)
    model.load_state_dict(from_hf_state_dict(hf, shape))
    return model.to(dtype)


def reshard(folder: Path, max_shard_bytes: int | None) -> list[str]:
    """Rewrite a checkpoint's weights with another shard size, tensors unchanged (None: one file)."""
    tensors = {}
    for file in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(str(file)))
    if not tensors:
        raise FileNotFoundError(f"no model*.safetensors in {folder}")
    return write_weights(tensors, folder, max_shard_bytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Reshard a checkpoint's safetensors in place.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--max-shard-mb", type=float, default=0, help="0: a single model.safetensors")
    args = parser.parse_args(argv)
    names = reshard(args.folder, int(args.max_shard_mb * 1e6) or None)
    print(f"checkpoint: {args.folder} now holds {', '.join(names)}")


if __name__ == "__main__":
    main()
