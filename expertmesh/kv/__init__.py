"""The paged KV cache: CPU bookkeeping of fixed-size blocks (block_manager), the per-layer block tensors (cache)
and the per-step tables that tell the attention kernels where each sequence's keys and values live (metadata)."""
