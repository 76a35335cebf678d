"""The paged KV cache on the device: per layer, keys and values as [num_blocks, block_size, kv_heads, head_dim], or for
multi-head latent attention (DeepSeek) one tensor [num_blocks, block_size, 1, kv_lora_rank + rope_dim] of latents.

A sequence's tokens live in the blocks its block table lists (block_manager.py); this module owns the tensors,
decides how many blocks fit in the device memory, and builds each step's block tables (metadata.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..model.spec import ModelSpec
from .metadata import StepMetadata, build_step_metadata

if TYPE_CHECKING:
    from ..config import EngineConfig

# Device memory kept out of the KV cache on CUDA, as a fraction of the device's total: what the step needs
# beyond the weights and the cache (activations, sampling, CUDA graph pools, transport buffers allocated later).
CUDA_ACTIVATION_MARGIN = 0.05


class KVCacheTooSmall(ValueError):
    """The cache cannot hold one sequence of the full context length."""


class PagedKVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        heads, dim, tensors = entry_layout(spec)
        shape = (num_blocks, block_size, heads, dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]  # MLA: the latents
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)] if tensors == 2 else []
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        """Layer i's caches: (keys, values), or MLA's (latents,)."""
        return (self.k[i], self.v[i]) if self.v else (self.k[i],)

    def step_metadata(self, seqs: list[tuple[list[int], int, int]], pad_to: tuple[int, int] | None = None,
                      block_table_width: int | None = None) -> StepMetadata:
        """build_step_metadata for this cache's block size and device; seqs: (block_ids, num_cached, num_new)."""
        return build_step_metadata(seqs, self.block_size, self.device, pad_to, block_table_width)


def entry_layout(spec: ModelSpec) -> tuple[int, int, int]:
    """(heads, dim, tensors) of what a token stores per layer: keys and values (2 tensors of kv_heads x head_dim), or
    MLA's latent and rope key (1 tensor of 1 x (kv_lora_rank + rope_dim))."""
    if spec.mla is not None:
        return 1, spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim, 1
    return spec.num_kv_heads, spec.head_dim, 2


def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    """Device bytes of one block across all layers, keys and values (or latents)."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    heads, dim, tensors = entry_layout(spec)
    return tensors * spec.num_layers * block_size * heads * dim * element_bytes


def num_blocks_for(engine: "EngineConfig", spec: ModelSpec, dtype: torch.dtype, device: torch.device | str) -> int:
    """How many blocks the cache gets.

    engine.num_kv_blocks when given. Otherwise on CUDA vLLM's --gpu-memory-utilization convention: this process
    may use that fraction of the device's total memory; the cache gets it minus what torch already holds here
    (call this after loading the weights) minus CUDA_ACTIVATION_MARGIN of the total, and never more than the
    device has free now (another process may share it). On CPU, and as a cap everywhere: blocks for
    max_num_seqs sequences of the full context, since no more can ever be used."""
    block_size = engine.block_size
    context_len = engine.context_len(spec)
    blocks_per_seq = -(-context_len // block_size)
    useful = engine.max_num_seqs * blocks_per_seq
    per_block = bytes_per_block(spec, block_size, dtype)
    device = torch.device(device)
    if engine.num_kv_blocks is not None:
        num_blocks, source = engine.num_kv_blocks, f"engine.num_kv_blocks={engine.num_kv_blocks}"
    elif device.type == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        budget = engine.gpu_memory_utilization * total_bytes - torch.cuda.memory_reserved(device)
        kv_bytes = min(budget, free_bytes) - CUDA_ACTIVATION_MARGIN * total_bytes
        num_blocks = min(useful, max(0, int(kv_bytes // per_block)))
        source = (f"gpu_memory_utilization={engine.gpu_memory_utilization} of {total_bytes / 2**30:.1f} GiB with "
                  f"{torch.cuda.memory_reserved(device) / 2**30:.2f} GiB already reserved, "
                  f"{free_bytes / 2**30:.1f} GiB free and a {CUDA_ACTIVATION_MARGIN:.0%} margin")
    else:
        num_blocks, source = useful, f"max_num_seqs={engine.max_num_seqs} sequences of the full context"
    if num_blocks < blocks_per_seq:
        raise KVCacheTooSmall(
            f"KV cache of {num_blocks} blocks ({source}; {per_block / 2**20:.2f} MiB per block of {block_size} "
            f"tokens) cannot hold one sequence of the full context of {context_len} tokens, which needs "
            f"{blocks_per_seq} blocks; lower engine.max_model_len or give the cache more memory")
    return num_blocks
