"""The KV cache sized by --gpu-memory-utilization on a real device: it is allocated, and the process stays within
the fraction it was given (less the activation margin)."""
import pytest
import torch

from expertmesh.config import EngineConfig
from expertmesh.kv.cache import CUDA_ACTIVATION_MARGIN, PagedKVCache, bytes_per_block, num_blocks_for
from expertmesh.model.spec import ModelSpec

pytestmark = pytest.mark.gpu


def test_sized_cache_fits_within_the_utilization(mixtral_dir):
    spec = ModelSpec.from_dir(mixtral_dir)
    engine = EngineConfig(max_num_seqs=10**9, max_model_len=512, gpu_memory_utilization=0.3, block_size=16)
    weights = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # stands in for the loaded weights
    num_blocks = num_blocks_for(engine, spec, torch.bfloat16, "cuda")
    cache = PagedKVCache(spec, num_blocks, engine.block_size, torch.bfloat16, "cuda")
    _, total = torch.cuda.mem_get_info()
    used = torch.cuda.memory_reserved()
    try:
        assert num_blocks * bytes_per_block(spec, 16, torch.bfloat16) > 0.1 * total  # most of what was left
        assert used <= (0.3 - CUDA_ACTIVATION_MARGIN) * total + 2**26  # allocator rounding
        meta = cache.step_metadata([([num_blocks - 1], 0, 3)])
        cache.k[0].view(-1, spec.num_kv_heads, spec.head_dim)[meta.slot_mapping] = 1.0
        assert cache.k[0][num_blocks - 1, :3].eq(1.0).all() and meta.slot_mapping.is_cuda
    finally:
        del cache, weights
        torch.cuda.empty_cache()
