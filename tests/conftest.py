"""Shared fixtures: small random checkpoints of every architecture, made once per test session."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on CPU tensors: their logic is tested without a GPU. Set before
    # any kernel module is imported (triton.jit reads it when it decorates).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from expertmesh.model.make_model import RandomModelShape, make_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("mixtral"), RandomModelShape(arch="mixtral"), seed=1)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    """Qwen3-MoE with a dense layer (mlp_only_layers) and without top-k renormalisation."""
    shape = RandomModelShape(arch="qwen3_moe", mlp_only_layers=[1], norm_topk_prob=False)
    return make_model(tmp_path_factory.mktemp("qwen3"), shape, seed=2)


@pytest.fixture(scope="session")
def qwen3_normed_dir(tmp_path_factory):
    """Qwen3-MoE with top-k renormalisation and a sparse step of 2 (odd layers dense)."""
    shape = RandomModelShape(arch="qwen3_moe", norm_topk_prob=True, decoder_sparse_step=2)
    return make_model(tmp_path_factory.mktemp("qwen3n"), shape, seed=3)


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory):
    """DeepSeek-V3: MLA with q LoRA, a dense first layer, a shared expert, 8 experts in 4 groups (top 2 groups),
    the correction bias, routed_scaling_factor and YaRN rotary (written with transformers 5's field names)."""
    shape = RandomModelShape(arch="deepseek_v3", yarn_factor=4.0)
    return make_model(tmp_path_factory.mktemp("deepseek"), shape, seed=4)
