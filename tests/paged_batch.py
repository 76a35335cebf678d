"""Random paged-attention steps for the attention-op tests: shuffled, non-contiguous blocks, mixed prefill and
decode sequences, padding sequences and tokens, with each sequence's keys and values also kept contiguous."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PagedStep:
    q: torch.Tensor  # [T, q_heads, head_dim]
    new_k: torch.Tensor  # [T, kv_heads, head_dim]: the step's own keys, not yet in the cache
    new_v: torch.Tensor
    slot_mapping: torch.Tensor  # [T] int64, -1 for padding tokens
    k_cache: torch.Tensor  # [blocks, block_size, kv_heads, head_dim]: earlier tokens written, the rest NaN
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32
    query_start: torch.Tensor  # [S+1] int32
    max_query_len: int
    scale: float
    keys: list[torch.Tensor]  # per sequence: [seq_len, kv_heads, head_dim], contiguous
    values: list[torch.Tensor]

    def attention_args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.query_start,
                self.max_query_len, self.scale)

    def write_new_kv(self) -> None:
        """What write_kv does, written independently: each sequence's new tokens at their positions."""
        block_size = self.k_cache.shape[1]
        starts = self.query_start.tolist()
        for s, seq_len in enumerate(self.seq_lens.tolist()):
            positions = torch.arange(seq_len - (starts[s + 1] - starts[s]), seq_len, device=self.q.device)
            blocks = self.block_table[s, positions // block_size].long()
            self.k_cache[blocks, positions % block_size] = self.new_k[starts[s]:starts[s + 1]]
            self.v_cache[blocks, positions % block_size] = self.new_v[starts[s]:starts[s + 1]]


def make_step(q_lens: list[int], seq_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, dtype: torch.dtype = torch.float32, device: str = "cpu", padding_tokens: int = 0,
              extra_table_blocks: int = 1, num_blocks: int | None = None, table_width: int | None = None,
              seed: int = 0) -> PagedStep:
    """q_lens[s] new tokens of a sequence of seq_lens[s] tokens (q_len 0 and seq_len 0: a padding sequence).
    Every cache slot no sequence uses holds NaN, so a read outside a sequence's keys shows in the output.
    num_blocks and table_width fix the cache's and the block table's sizes (a CUDA graph's static buffers)."""
    assert len(q_lens) == len(seq_lens) and all(q <= n for q, n in zip(q_lens, seq_lens))
    host_gen = torch.Generator().manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_needed = [math.ceil(n / block_size) for n in seq_lens]
    table_width = table_width or max(blocks_needed) + extra_table_blocks
    num_blocks = num_blocks or sum(blocks_needed) + 3
    assert table_width >= max(blocks_needed) and num_blocks > sum(blocks_needed)
    order = torch.randperm(num_blocks, generator=host_gen).to(torch.int32)
    spare = order[-1]  # table entries past a sequence's blocks point here; never read
    block_table = torch.full((len(seq_lens), table_width), int(spare), dtype=torch.int32)
    for s, owned in enumerate(order[:sum(blocks_needed)].split(blocks_needed)):
        block_table[s, :len(owned)] = owned
    block_table = block_table.to(device)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    keys = randn(sum(seq_lens), num_kv_heads, head_dim).split(seq_lens)
    values = randn(sum(seq_lens), num_kv_heads, head_dim).split(seq_lens)
    tokens = sum(q_lens) + padding_tokens
    new_k, new_v = randn(tokens, num_kv_heads, head_dim), randn(tokens, num_kv_heads, head_dim)
    slot_mapping = torch.full((tokens,), -1, dtype=torch.int64, device=device)
    row = 0
    for s, (q_len, n) in enumerate(zip(q_lens, seq_lens)):
        positions = torch.arange(n, device=device)
        blocks = block_table[s, positions // block_size].long()
        cached = n - q_len  # tokens written by earlier steps; the rest are this step's, for write_kv
        k_cache[blocks[:cached], positions[:cached] % block_size] = keys[s][:cached]
        v_cache[blocks[:cached], positions[:cached] % block_size] = values[s][:cached]
        new_k[row:row + q_len], new_v[row:row + q_len] = keys[s][cached:], values[s][cached:]
        slot_mapping[row:row + q_len] = blocks[cached:] * block_size + positions[cached:] % block_size
        row += q_len
    query_start = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return PagedStep(
        q=randn(tokens, num_q_heads, head_dim), new_k=new_k, new_v=new_v, slot_mapping=slot_mapping,
        k_cache=k_cache, v_cache=v_cache, block_table=block_table,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), query_start=query_start.to(device),
        max_query_len=max(max(q_lens), 1), scale=head_dim ** -0.5, keys=list(keys), values=list(values))


def dense_attention(step: PagedStep) -> torch.Tensor:
    """The step's attention from the contiguous keys and values, an explicit softmax in float64 per query."""
    q = step.q.double()
    out = torch.zeros_like(q)
    group = q.shape[1] // step.keys[0].shape[1] if step.keys else 1
    starts = step.query_start.tolist()
    for s, seq_len in enumerate(step.seq_lens.tolist()):
        q_len = starts[s + 1] - starts[s]
        keys = step.keys[s].double().repeat_interleave(group, dim=1)  # [seq_len, q_heads, head_dim]
        values = step.values[s].double().repeat_interleave(group, dim=1)
        for j in range(q_len):
            pos = seq_len - q_len + j
            scores = torch.einsum("hd,nhd->hn", q[starts[s] + j], keys[:pos + 1]) * step.scale
            out[starts[s] + j] = torch.einsum("hn,nhd->hd", scores.softmax(-1), values[:pos + 1])
    return out
