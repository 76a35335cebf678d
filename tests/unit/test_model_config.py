"""config.json as transformers writes it today and as released models ship it: each parses into the right spec, or is
refused with an error naming the field; checkpoints saved by the installed transformers serve its logits."""
import asyncio
import json
from pathlib import Path

import pytest
import torch

from expertmesh.model.rotary import inverse_frequencies
from expertmesh.model.spec import ModelSpec, UnsupportedModelError
from tests.inproc_cluster import InprocCluster

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "hf_configs"


def released(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def test_released_mixtral_and_qwen3_parse_into_their_published_shapes():
    mixtral = ModelSpec.from_hf_config(released("mixtral-8x7b-instruct-v0.1"))
    assert (mixtral.num_experts, mixtral.top_k, mixtral.head_dim, mixtral.num_kv_heads) == (8, 2, 128, 8)
    assert mixtral.rope.theta == 1e6 and mixtral.moe_layers == (True,) * 32 and mixtral.eos_token_ids == (2,)
    small, large = ModelSpec.from_hf_config(released("qwen3-30b-a3b")), ModelSpec.from_hf_config(
        released("qwen3-235b-a22b"))
    assert (small.num_experts, small.top_k, small.expert_intermediate_size, small.num_layers) == (128, 8, 768, 48)
    assert (large.hidden_size, large.num_heads, large.expert_intermediate_size, large.num_layers) == (4096, 64, 1536, 94)
    assert small.norm_topk_prob and small.qk_norm and small.rope.rope_type == "default" and all(large.moe_layers)


@pytest.mark.parametrize("name, experts, groups, top_groups, dense, scale, factor", [
    ("deepseek-v3", 256, 8, 4, 3, 2.5, 40.0), ("kimi-k2-instruct", 384, 1, 1, 1, 2.827, 32.0)])
def test_released_deepseek_architectures_refuse_fp8_and_parse_once_dequantized(name, experts, groups, top_groups,
                                                                               dense, scale, factor):
    cfg = released(name)
    with pytest.raises(UnsupportedModelError, match="quantization_config.quant_method='fp8'"):
        ModelSpec.from_hf_config(cfg)
    del cfg["quantization_config"]  # what a bf16 conversion of the checkpoint writes
    spec = ModelSpec.from_hf_config(cfg)
    assert (spec.num_experts, spec.num_expert_groups, spec.top_groups, spec.top_k) == (experts, groups, top_groups, 8)
    assert spec.moe_layers == (False,) * dense + (True,) * (61 - dense)
    assert (spec.mla.q_lora_rank, spec.mla.kv_lora_rank, spec.mla.qk_nope_head_dim, spec.mla.qk_rope_head_dim,
            spec.mla.v_head_dim) == (1536, 512, 128, 64, 128)
    assert spec.routed_scaling_factor == scale and spec.shared_intermediate_size == 2048 and spec.scoring == "sigmoid"
    assert spec.rope.rope_type == "yarn" and spec.rope.factor == factor and spec.rope.interleave
    assert spec.rope.original_max_position_embeddings == 4096 and spec.head_dim == 64 and spec.num_kv_heads == 1


TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts_per_tok=2)
YARN = {"rope_type": "yarn", "rope_theta": 5e4, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}


def transformers_configs():
    """Configs of every supported class as the installed transformers builds them (old keyword names included)."""
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig
    return {
        "mixtral": MixtralConfig(**TINY, num_local_experts=4, architectures=["MixtralForCausalLM"]),
        "qwen3-old-names": Qwen3MoeConfig(**TINY, head_dim=8, num_experts=4, moe_intermediate_size=16,
                                          rope_theta=1e6, mlp_only_layers=[1], architectures=["Qwen3MoeForCausalLM"]),
        "qwen3-yarn": Qwen3MoeConfig(**TINY, head_dim=8, num_local_experts=4, moe_intermediate_size=16,
                                     rope_parameters=dict(YARN), max_position_embeddings=512,
                                     architectures=["Qwen3MoeForCausalLM"]),
        "deepseek-v3": DeepseekV3Config(**{**TINY, "num_key_value_heads": 4}, moe_intermediate_size=16,
                                        n_routed_experts=8, n_group=4, topk_group=2, first_k_dense_replace=1,
                                        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                        v_head_dim=8, rope_parameters=dict(YARN), max_position_embeddings=512,
                                        architectures=["DeepseekV3ForCausalLM"]),
        # DeepSeek-V2-Lite-like: one full q_proj, one group, default rotary laid out in halves, no renormalisation
        "deepseek-v3-plain": DeepseekV3Config(**{**TINY, "num_key_value_heads": 4}, moe_intermediate_size=16,
                                              n_routed_experts=8, n_group=1, topk_group=1, first_k_dense_replace=0,
                                              q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                                              qk_rope_head_dim=8, v_head_dim=8, norm_topk_prob=False,
                                              rope_interleave=False, architectures=["DeepseekV3ForCausalLM"]),
    }


@pytest.mark.parametrize("name", ["mixtral", "qwen3-old-names", "qwen3-yarn", "deepseek-v3", "deepseek-v3-plain"])
def test_configs_written_by_transformers_parse_as_transformers_reads_them(name, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = transformers_configs()[name]
    config.save_pretrained(tmp_path)
    spec = ModelSpec.from_dir(tmp_path)
    assert spec.num_experts == config.num_local_experts  # the name transformers 5 writes, whatever was given
    assert (spec.top_k, spec.num_layers, spec.hidden_size) == (2, 2, 32)
    assert spec.rope.theta == config.rope_parameters["rope_theta"]
    dim = spec.head_dim if spec.mla is None else spec.mla.qk_rope_head_dim
    inv_freq, scale = inverse_frequencies(spec.rope, dim)
    if spec.rope.rope_type == "default":
        expected, expected_scale = 1.0 / (spec.rope.theta ** (torch.arange(0, dim, 2).float() / dim)), 1.0
    else:
        expected, expected_scale = ROPE_INIT_FUNCTIONS["yarn"](config)
    assert torch.equal(inv_freq, expected) and scale == expected_scale
    if name == "qwen3-old-names":
        assert spec.moe_layers == (True, False) and spec.rope.theta == 1e6
    if name == "deepseek-v3":
        assert spec.moe_layers == (False, True) and spec.rope.interleave and spec.mla.kv_lora_rank == 16


@pytest.mark.parametrize("change, named", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "group_limited_greedy"}, "topk_method"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group=9"),
    ({"n_group": 64, "topk_group": 1}, "top 8 of 256"),
])
def test_unsupported_fields_are_refused_by_name(change, named):
    cfg = {**released("deepseek-v3"), **change}
    cfg.pop("quantization_config")
    with pytest.raises(UnsupportedModelError, match=named):
        ModelSpec.from_hf_config(cfg)


def test_missing_fields_and_sliding_windows_are_named():
    cfg = released("qwen3-30b-a3b")
    del cfg["num_experts"]
    with pytest.raises(UnsupportedModelError, match="num_local_experts / num_experts / n_routed_experts"):
        ModelSpec.from_hf_config(cfg)
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        ModelSpec.from_hf_config({**released("qwen3-30b-a3b"), "use_sliding_window": True})
    with pytest.raises(UnsupportedModelError, match="sliding_window=4096"):
        ModelSpec.from_hf_config({**released("mixtral-8x7b-instruct-v0.1"), "sliding_window": 4096})


@pytest.mark.parametrize("name", ["mixtral", "qwen3-old-names", "qwen3-yarn", "deepseek-v3", "deepseek-v3-plain"])
def test_checkpoints_saved_by_transformers_serve_its_logits(name, tmp_path):
    """The issue's first report: a checkpoint saved by the installed transformers (its config names, its tensor
    names) loads and gives transformers' logits, disaggregated."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    config = transformers_configs()[name]
    config.initializer_range = 0.5  # logits far from zero, so that the comparison means something
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    prompts = [[5, 6, 7, 8, 9], [300, 2]]

    async def run():
        async with InprocCluster(tmp_path, num_expert_nodes=2) as cluster:
            return await cluster.prefill_logits(prompts)

    logits = asyncio.run(run())
    with torch.no_grad():
        for row, prompt in zip(logits, prompts):
            expected = model(torch.tensor([prompt])).logits[0, -1]
            assert expected.abs().max() > 0.1 and (expected - row).abs().max().item() < 1e-4


@pytest.mark.parametrize("config_class, arch, experts_field", [
    ("MixtralConfig", "MixtralForCausalLM", "num_local_experts"),
    ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "num_experts"),
    ("DeepseekV3Config", "DeepseekV3ForCausalLM", "n_routed_experts")])
def test_fields_left_out_take_the_defaults_of_transformers_config_class(config_class, arch, experts_field):
    """A config.json with only the sizes parses as the full config transformers builds from it."""
    import transformers
    minimal = {"architectures": [arch], "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4,
               "num_attention_heads": 4, experts_field: 16, "num_experts_per_tok": 2}
    full = getattr(transformers, config_class)(**minimal).to_dict()
    assert ModelSpec.from_hf_config(minimal) == ModelSpec.from_hf_config(full)
