"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of latents: the cache write and one attention op
for any mix of prefill chunks and decode steps.

Per layer the cache is one tensor [num_blocks, block_size, 1, kv_lora_rank + rope_dim]: each token's normed kv latent
and its rotated rope key, the only per-token state MLA needs (576 values a token and layer for DeepSeek-V3, against
2 x 128 heads x 192 for the keys and values it stands for). Keys and values are the latent through kv_b_proj, per head
[k_nope | v]; a query head's score is q_nope.k_nope + q_rope.k_rope. Decode attention has a Triton kernel (CUDA)
beside its torch reference."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import _LOG2_E, _combine_splits_kernel, _num_sms, _paged_keys, _split_range, sequences_of, write_kv
from .backend import pick_backend, tl, triton


def write_latent(latent: torch.Tensor, rope_key: torch.Tensor, cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Store each token's latent [T, rank] and rotated rope key [T, rope_dim] at slot_mapping[t] (-1: skipped)."""
    entry = torch.cat([latent, rope_key], dim=-1).unsqueeze(1)
    write_kv(entry, entry, cache, cache, slot_mapping)  # one tensor: it is both caches of the (k, v) write op


def mla_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, kv_b_proj: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int,
                  scale: float, *, backend: str = "auto") -> torch.Tensor:
    """Causal attention of each sequence's new queries (q_nope [T, H, nope], q_rope [T, H, rope], rotated) over its
    cached latents (written by write_latent; block_table, seq_lens, query_start as paged_attention takes them).
    kv_b_proj: [H * (nope + v_dim), rank]. Returns [T, H, v_dim]; rows no sequence owns are zeros.

    A pure decode step takes the absorbed path: kv_b_proj's key half folds into the query and its value half applies
    after attention, so attention runs as multi-query attention over the latents themselves and no step expands
    the whole context into per-head keys and values (that expansion costs context x rank x H x (nope + v) per
    step, the absorbed query H x nope x rank per token). A step with prefill expands the context once: its many
    queries then score against per-head keys of 192 values instead of latents of 576 (DeepSeek-V3's sizes)."""
    heads, nope = q_nope.shape[1], q_nope.shape[2]
    rank = cache.shape[-1] - q_rope.shape[-1]
    kv_b = kv_b_proj.view(heads, -1, rank)  # per head: nope rows of the key, then v_dim rows of the value
    if max_query_len <= 1:
        query = torch.cat([torch.einsum("thn,hnr->thr", q_nope, kv_b[:, :nope]), q_rope], dim=-1)
        out = mla_decode(query, cache, rank, block_table, seq_lens, query_start, scale, backend=backend)
        return torch.einsum("thr,hvr->thv", out, kv_b[:, nope:])
    return mla_attention_expanded(q_nope, q_rope, cache, kv_b_proj, block_table, seq_lens, query_start, scale)


def mla_decode(query: torch.Tensor, cache: torch.Tensor, rank: int, block_table: torch.Tensor, seq_lens: torch.Tensor,
               query_start: torch.Tensor, scale: float, *, backend: str = "auto") -> torch.Tensor:
    """Absorbed decode attention (mla_decode_reference says what it computes): the Triton kernel or the reference."""
    args = (query, cache, rank, block_table, seq_lens, query_start, scale)
    if pick_backend(query.device, backend, "mla_decode") == "triton":
        return mla_decode_triton(*args)
    return mla_decode_reference(*args)


def mla_decode_reference(query: torch.Tensor, cache: torch.Tensor, rank: int, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, query_start: torch.Tensor, scale: float) -> torch.Tensor:
    """Absorbed attention of at most one new token per sequence (query [T, H, rank + rope]) over its latent entries:
    the H heads are H queries against one shared key/value head, so no per-head copy of the keys, and every token at
    once over the block table's whole width, masked past its sequence's length: no host sync, so a CUDA graph
    captures it. Rows no sequence owns are zeros. [T, H, rank]

    Its cost and scratch memory grow with the table's width (under CUDA graphs, the whole context bound) rather than
    with each sequence's length: on an H200 `bench layer --shapes deepseek_v3` timed the attention part with it at
    4.6-12.6x its floor (64 and 256 tokens), hence mla_decode_triton on GPUs. The CPU path and the kernel's oracle."""
    tokens, block_size = query.shape[0], cache.shape[1]
    token_ids = torch.arange(tokens, device=query.device)
    seq_of = torch.searchsorted(query_start[1:].long(), token_ids, right=True).clamp(max=block_table.shape[0] - 1)
    offsets = torch.arange(block_size, device=query.device)
    slots = (block_table[seq_of].long()[:, :, None] * block_size + offsets).flatten(1)  # [T, width * block_size]
    visible = (torch.arange(slots.shape[1], device=query.device)[None, :] < seq_lens[seq_of][:, None]) & (
        token_ids < query_start[-1])[:, None]
    # [T, context bound, rank + rope]; slots past a sequence's end may hold anything, even NaN: zeroed
    entries = cache.flatten(0, 2)[slots].masked_fill(~visible[:, :, None], 0.0)
    scores = torch.einsum("thd,tcd->thc", query, entries).float() * scale
    probs = torch.softmax(scores.masked_fill(~visible[:, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("thc,tcr->thr", probs.to(query.dtype), entries[..., :rank])


def mla_attention_expanded(q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, kv_b_proj: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Per sequence: its latents through kv_b_proj into per-head keys and values, then scaled_dot_product_attention
    with a causal mask offset by the cached context: transformers' DeepseekV3Attention, op for op (the reference
    of the exactness tests)."""
    tokens, heads, nope = q_nope.shape
    rank = cache.shape[-1] - q_rope.shape[-1]
    v_dim = kv_b_proj.shape[0] // heads - nope
    out = q_nope.new_zeros(tokens, heads, v_dim)
    query = torch.cat([q_nope, q_rope], dim=-1)
    for start, end, slots, mask in sequences_of(block_table, seq_lens, query_start, cache.shape[1]):
        entries = cache.flatten(0, 1)[slots, 0]  # [context, rank + rope]
        context = entries.shape[0]
        latent, rope_key = entries[:, :rank], entries[:, rank:]
        k_nope, value = (latent @ kv_b_proj.T).view(context, heads, nope + v_dim).split([nope, v_dim], dim=-1)
        key = torch.cat([k_nope, rope_key.unsqueeze(1).expand(context, heads, -1)], dim=-1)
        out[start:end] = F.scaled_dot_product_attention(query[start:end].transpose(0, 1), key.transpose(0, 1),
                                                        value.transpose(0, 1), attn_mask=mask,
                                                        scale=scale).transpose(0, 1)
    return out


# ------------------------------------------------------------------------------------------ Triton decode kernel

@dataclass(frozen=True)
class MLALaunch:
    """Tile sizes and grid shape of one MLA decode launch (choose_mla_launch picks them; tests and tuning runs may
    pass their own)."""
    block_h: int  # query heads per program: each key tile loaded serves all of them
    block_n: int  # cached tokens per inner-loop step
    num_splits: int  # programs per (sequence, head tile) over disjoint token ranges, combined by a second kernel
    num_warps: int
    num_stages: int


# MLA decode is multi-query attention with 128 heads: a cached token (576 values) feeds 128 x 2 x (576 + 512) flops,
# about as many flops per byte as an H200 does at its peak, so a program takes as many heads as its registers hold:
# 64 heads x rank 512 of float32 accumulator is 128 registers a thread of 8 warps. The head tiles of one (sequence,
# split) are neighbours on the grid's fastest axis, so they run together and read each key tile once from memory,
# the other times from L2. With fewer programs than the GPU holds (few sequences over a long context) each
# sequence's tokens are split over several programs (flash-decoding) and ops/attention.py's combine kernel merges
# their partial results. Tiles measured on one H200 at 128 heads x (512 + 64), 4096 tokens (tests/gpu/test_mla_gpu.py,
# RESULTS.md): 64 heads x 64 tokens with 8 warps took 3.3x the floor at 64 and 256 sequences, 16 x 32 with 4 warps 8.4x.
_MLA_BLOCK_H = 64
_MLA_BLOCK_N = 64  # a bf16 key tile of 64 x 576 values: 72 KB of shared memory a stage (32 tokens for float32)
# Split a sequence's tokens while its programs would fill under half the SMs: a 64-head program takes most of an
# SM's shared memory (two 72 KB stages), a split adds a combine pass, and at 64 sequences (128 programs on the H200's
# 132 SMs) one split ran at 3.3x the floor; a sequence alone ran 16 splits in 45 us.
_MLA_SPLIT_BELOW_SMS = 0.5
_MLA_MAX_SPLITS = 16
_MLA_MIN_TOKENS_PER_SPLIT = 256  # a split's tokens cost as much compute as 4 x 512 keys of paged_attention's


def choose_mla_launch(num_seqs: int, num_heads: int, max_context: int, num_sms: int,
                      itemsize: int = 2) -> MLALaunch:
    """Tiles and split count from host-known sizes only (max_context is the block table's capacity, a bound), so the
    same launch is replayed by a CUDA graph whatever the sequences' lengths. itemsize: the cache's bytes a value."""
    block_h = min(_MLA_BLOCK_H, max(16, triton.next_power_of_2(num_heads)))  # no tile of padding heads only
    block_n = _MLA_BLOCK_N if itemsize <= 2 else _MLA_BLOCK_N // 2  # two stages of the key tile in shared memory
    programs = num_seqs * -(-num_heads // block_h)
    num_splits = 1
    while (num_splits < _MLA_MAX_SPLITS and programs * num_splits < _MLA_SPLIT_BELOW_SMS * num_sms
           and max_context >= 2 * num_splits * _MLA_MIN_TOKENS_PER_SPLIT):
        num_splits *= 2
    return MLALaunch(block_h=block_h, block_n=block_n, num_splits=num_splits, num_warps=8 if block_h >= 32 else 4,
                     num_stages=2)


@triton.jit(do_not_specialize=["stride_table"])  # step-dependent: no variant per value (see norm.py)
def _mla_decode_kernel(
        query_ptr, cache_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, block_table_ptr, seq_lens_ptr,
        query_start_ptr, num_heads, scale_log2, stride_q_token, stride_q_head, stride_c_block, stride_c_offset,
        stride_out_token, stride_out_head, stride_table,
        RANK: tl.constexpr, RANK_PAD: tl.constexpr, ROPE: tl.constexpr, ROPE_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_H query heads of one sequence's new token over the split-th share of its cached tokens.
    Keys are each token's whole entry (latent | rope key), values its latent: one load of the latent serves both."""
    head_tile = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    token = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) == token:  # a padding sequence
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    heads = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    head_real = heads < num_heads
    lat = tl.arange(0, RANK_PAD)
    lat_real = lat < RANK
    rope = tl.arange(0, ROPE_PAD)
    rope_real = rope < ROPE
    q_row = query_ptr + token * stride_q_token + heads[:, None] * stride_q_head
    q_lat = tl.load(q_row + lat[None, :], mask=head_real[:, None] & lat_real[None, :], other=0.0)
    q_rope = tl.load(q_row + RANK + rope[None, :], mask=head_real[:, None] & rope_real[None, :], other=0.0)
    if DOT_FP32:
        q_lat = q_lat.to(tl.float32)
        q_rope = q_rope.to(tl.float32)

    kv_lo, kv_hi = _split_range(seq_len, split, NUM_SPLITS, BLOCK_N)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the scores, in log2 units
    l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_H, RANK_PAD], tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        _, key_real, block, offset = _paged_keys(block_table_ptr, seq, stride_table, start, kv_hi, BLOCK_SIZE, BLOCK_N)
        entry = cache_ptr + block[:, None] * stride_c_block + offset[:, None] * stride_c_offset
        latent = tl.load(entry + lat[None, :], mask=key_real[:, None] & lat_real[None, :], other=0.0)
        rope_key = tl.load(entry + RANK + rope[None, :], mask=key_real[:, None] & rope_real[None, :], other=0.0)
        value = latent
        if DOT_FP32:
            latent = latent.to(tl.float32)
            rope_key = rope_key.to(tl.float32)
        scores = tl.dot(q_lat, tl.trans(latent), input_precision=DOT_PRECISION)
        scores = tl.dot(q_rope, tl.trans(rope_key), scores, input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(key_real[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every tile has a real key
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        p_value = p.to(value.dtype)  # probabilities at the values' precision, as the reference has them
        if DOT_FP32:
            p_value = p_value.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_value, latent, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    store_mask = head_real[:, None] & lat_real[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i 0: a sequence with no cached token gives zeros
        tl.store(out_ptr + token * stride_out_token + heads[:, None] * stride_out_head + lat[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:  # partials [T, H, NUM_SPLITS, (RANK_PAD)] as ops/attention.py's combine reads them; empty share: -inf, 0, 0
        part = (token * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_max_ptr + part, m_i, mask=head_real)
        tl.store(part_sum_ptr + part, l_i, mask=head_real)
        tl.store(part_acc_ptr + part[:, None] * RANK_PAD + lat[None, :], acc, mask=store_mask)


def mla_decode_triton(query: torch.Tensor, cache: torch.Tensor, rank: int, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, query_start: torch.Tensor, scale: float,
                      launch: MLALaunch | None = None) -> torch.Tensor:
    num_tokens, num_heads, entry_dim = query.shape
    num_seqs, max_blocks = block_table.shape
    rope_dim = entry_dim - rank
    if cache.dim() != 4 or cache.shape[2:] != (1, entry_dim):
        raise ValueError(f"the latent cache must be [blocks, block_size, 1, {entry_dim}] (the query's rank + rope), "
                         f"got {tuple(cache.shape)}")
    if not 0 < rank < entry_dim:
        raise ValueError(f"rank {rank} must leave a rope part of the query's {entry_dim} values")
    if query.stride(-1) != 1 or cache.stride(-1) != 1:
        raise ValueError(f"query and cache need a contiguous last dim, got strides {query.stride()} and "
                         f"{cache.stride()}")
    if seq_lens.shape != (num_seqs,) or query_start.shape != (num_seqs + 1,):
        raise ValueError(f"seq_lens must be [{num_seqs}] and query_start [{num_seqs + 1}], got "
                         f"{tuple(seq_lens.shape)} and {tuple(query_start.shape)}")
    block_size = cache.shape[1]
    if launch is None:
        launch = choose_mla_launch(num_seqs, num_heads, max_blocks * block_size, _num_sms(query.device),
                                   cache.element_size())
    if any(n & (n - 1) for n in (launch.block_h, launch.block_n, launch.num_splits)) or min(
            launch.block_h, launch.block_n) < 16:
        raise ValueError(f"block_h, block_n and num_splits must be powers of two, block_h and block_n at least 16 "
                         f"(tl.dot's smallest tile): {launch}")
    if num_tokens == 0 or num_seqs == 0:
        return query.new_zeros(num_tokens, num_heads, rank)

    rank_pad, rope_pad = max(16, triton.next_power_of_2(rank)), max(16, triton.next_power_of_2(rope_dim))
    # Triton's interpreter (CPU tensors) computes bf16 tl.dot wrongly (triton 3.6): there the kernel multiplies in
    # float32, which gives the products a GPU's bf16 MMA accumulates in float32 anyway (as ops/fused_moe_triton.py)
    dot_fp32 = not query.is_cuda
    splits = launch.num_splits
    if splits == 1:
        out = query.new_zeros(num_tokens, num_heads, rank)  # rows no sequence owns stay zero
        part_acc = part_max = part_sum = out  # unused
    else:
        out = query.new_empty(num_tokens, num_heads, rank)  # the combine kernel writes every row
        part_max = torch.full((num_tokens, num_heads, splits), float("-inf"), dtype=torch.float32, device=query.device)
        part_sum = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32, device=query.device)
        part_acc = torch.empty((num_tokens, num_heads, splits, rank_pad), dtype=torch.float32, device=query.device)
    _mla_decode_kernel[(-(-num_heads // launch.block_h), num_seqs, splits)](
        query, cache, out, part_acc, part_max, part_sum, block_table, seq_lens, query_start, num_heads,
        scale * _LOG2_E, query.stride(0), query.stride(1), cache.stride(0), cache.stride(1), out.stride(0),
        out.stride(1), block_table.stride(0),
        RANK=rank, RANK_PAD=rank_pad, ROPE=rope_dim, ROPE_PAD=rope_pad, BLOCK_SIZE=block_size,
        BLOCK_H=launch.block_h, BLOCK_N=launch.block_n, NUM_SPLITS=splits, DOT_FP32=dot_fp32,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or dot_fp32 else "tf32",
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    if splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            part_acc, part_max, part_sum, out, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=rank, DIM_PAD=rank_pad, NUM_SPLITS=splits, num_warps=4)
    return out
