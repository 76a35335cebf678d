import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertmesh.model.checkpoint import Checkpoint, CheckpointError
from expertmesh.model.spec import ModelSpec, UnsupportedModelError
from expertmesh.model.weights import load_attention_side, load_experts


def test_qwen3_dense_layers_from_mlp_only_layers_and_sparse_step(qwen3_dir, qwen3_normed_dir):
    spec = ModelSpec.from_dir(qwen3_dir)
    assert spec.moe_layers == (True, False, True, True) and not spec.norm_topk_prob and spec.qk_norm
    spec = ModelSpec.from_dir(qwen3_normed_dir)
    assert spec.moe_layers == (False, True, False, True) and spec.norm_topk_prob
    assert spec.moe_layer_ids == [1, 3]


def test_unsupported_architecture_and_rope_are_named():
    base = json.loads('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        ModelSpec.from_hf_config(base)
    cfg = {"architectures": ["MixtralForCausalLM"], "rope_scaling": {"rope_type": "longrope"}}
    with pytest.raises(UnsupportedModelError, match="longrope"):
        ModelSpec.from_hf_config(cfg)


def test_missing_tensor_and_shape_mismatch_are_named(mixtral_dir, tmp_path):
    spec = ModelSpec.from_dir(mixtral_dir)
    broken = tmp_path / "broken"
    shutil.copytree(mixtral_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.k_proj.weight.* missing"):
        load_attention_side(broken, spec, torch.float32)
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*shape \(3,\), expected \(64,\)"):
        Checkpoint(broken).get("model.norm.weight", (64,), torch.float32)


def test_each_side_reads_only_its_tensors(mixtral_dir, monkeypatch):
    spec = ModelSpec.from_dir(mixtral_dir)
    read = []
    original = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name, *a, **k: read.append(name) or original(self, name, *a, **k))
    experts = load_experts(mixtral_dir, spec, [(0, 3), (2, 5)], torch.float32)
    assert {layer: stacked.expert_ids for layer, stacked in experts.items()} == {0: [3], 2: [5]}
    assert sorted(read) == sorted(f"model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight"
                                  for l, e in [(0, 3), (2, 5)] for w in ("w1", "w2", "w3"))
    read.clear()
    load_attention_side(mixtral_dir, spec, torch.float32)
    assert read and not any(".experts." in name for name in read)


def test_experts_are_stacked_per_layer_in_expert_order(mixtral_dir):
    spec = ModelSpec.from_dir(mixtral_dir)
    tensors = load_file(mixtral_dir / "model.safetensors")
    experts = load_experts(mixtral_dir, spec, [(1, 6), (1, 2), (3, 0), (1, 2)], torch.float32)
    assert sorted(experts) == [1, 3] and experts[1].expert_ids == [2, 6] and experts[3].expert_ids == [0]
    stacked = experts[1]
    assert stacked.local_index.tolist() == [-1, -1, 0, -1, -1, -1, 1, -1]
    inter = spec.expert_intermediate_size
    for row, e in enumerate(stacked.expert_ids):
        p = f"model.layers.1.block_sparse_moe.experts.{e}"
        assert torch.equal(stacked.gate_up[row, :inter], tensors[f"{p}.w1.weight"])  # gate
        assert torch.equal(stacked.gate_up[row, inter:], tensors[f"{p}.w3.weight"])  # up
        assert torch.equal(stacked.down[row], tensors[f"{p}.w2.weight"])
    with pytest.raises(ValueError, match="layer 9, expert 0"):
        load_experts(mixtral_dir, spec, [(9, 0)], torch.float32)


def test_sharded_checkpoint_loads(mixtral_dir, tmp_path):
    tensors = load_file(mixtral_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: f for f, part in shards.items() for n in part}}))
    shutil.copy(mixtral_dir / "config.json", tmp_path / "config.json")
    spec = ModelSpec.from_dir(tmp_path)
    weights = load_attention_side(tmp_path, spec, torch.float32)
    assert torch.equal(weights.lm_head, tensors["lm_head.weight"])


def test_make_model_is_deterministic(tmp_path):
    from expertmesh.model.make_model import RandomModelShape, make_model
    a = load_file(make_model(tmp_path / "a", RandomModelShape(), seed=5) / "model.safetensors")
    b = load_file(make_model(tmp_path / "b", RandomModelShape(), seed=5) / "model.safetensors")
    c = load_file(make_model(tmp_path / "c", RandomModelShape(), seed=6) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
