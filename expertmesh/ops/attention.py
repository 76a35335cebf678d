"""Paged attention over a block-table KV cache: the cache write and one attention op for any mix of prefill
chunks and decode steps, each as a plain-torch reference (CPU path and oracle) beside a Triton kernel.

Per layer the cache is k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]; key position p of sequence s
lives at block block_table[s, p // block_size], offset p % block_size. A step is a flat batch of tokens, each
sequence's new tokens in a row; query_start [S+1] says where each sequence's rows are. Sequences with no new tokens
are padding (CUDA-graph buckets); rows of the batch that no sequence owns come out as zeros."""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import pick_backend, tl, triton

_LOG2_E = 1.4426950408889634
P_PARTS = 3  # 16-bit parts of the softmax weights in a bf16/fp16 P.V product (the kernel's docstring says why;
# softmax_parts where a decode tile keeps fewer)


# ---------------------------------------------------------------------------------------------- KV-cache write

def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, backend: str = "auto") -> None:
    """Store each token's k, v ([T, kv_heads, head_dim]) at slot_mapping[t] = block * block_size + offset of the
    caches; slot -1 marks a padding token, which is skipped."""
    if pick_backend(k.device, backend, "write_kv") == "triton":
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def write_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    real = slot_mapping >= 0  # a boolean mask syncs on CUDA: this is the CPU path
    slots = slot_mapping[real]
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k[real].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[real].to(v_cache.dtype)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                     stride_k_token, stride_k_head, stride_v_token, stride_v_head,
                     stride_kc_block, stride_kc_offset, stride_kc_head,
                     stride_vc_block, stride_vc_offset, stride_vc_head,
                     NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                     DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_k_token + heads * stride_k_head + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + heads * stride_v_head + dims, mask=mask)
    tl.store(k_cache_ptr + block * stride_kc_block + offset * stride_kc_offset + heads * stride_kc_head + dims,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_vc_block + offset * stride_vc_offset + heads * stride_vc_head + dims,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    tokens, num_heads, head_dim = k.shape
    _check_cache(k_cache, v_cache, num_heads, head_dim)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k and v need a contiguous last dim, got strides {k.stride()} and {v.stride()}")
    if slot_mapping.shape != (tokens,):
        raise ValueError(f"slot_mapping must be [{tokens}], got {tuple(slot_mapping.shape)}")
    if tokens == 0:
        return
    _write_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1])


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(f"caches must both be [blocks, block_size, {num_kv_heads}, {head_dim}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    block_size = k_cache.shape[1]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"caches need a contiguous head_dim, got strides {k_cache.stride()} and {v_cache.stride()}")


# -------------------------------------------------------------------------------------------- paged attention

def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int, scale: float,
                    *, backend: str = "auto") -> torch.Tensor:
    """Causal attention of each sequence's new queries (q: [T, q_heads, head_dim]) over its cached keys.

    Sequence s owns rows query_start[s]:query_start[s+1] of q (q_len of them) and has seq_lens[s] tokens in the
    cache, its new ones included (written by write_kv); its query j sits at position seq_lens[s] - q_len + j and
    sees keys 0..that position. block_table [S, max_blocks] int32, seq_lens [S] int32, query_start [S+1] int32;
    max_query_len is a host-known bound on every q_len (1: a pure decode step, 0: all padding). Returns
    [T, q_heads, head_dim] in q.dtype; rows no sequence owns are zeros."""
    args = (q, k_cache, v_cache, block_table, seq_lens, query_start, max_query_len, scale)
    if pick_backend(q.device, backend, "paged_attention") == "triton":
        return paged_attention_triton(*args)
    return paged_attention_reference(*args)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
                              max_query_len: int, scale: float) -> torch.Tensor:
    """One scaled_dot_product_attention per sequence in q.dtype over its keys gathered from its blocks: no mask
    for a single new token, a causal mask offset by the cached context otherwise. These are the calls the attention
    layer made on its contiguous cache, which the exactness tests against transformers hold to."""
    out = torch.zeros_like(q)
    for start, end, slots, mask in sequences_of(block_table, seq_lens, query_start, k_cache.shape[1]):
        k_seq = k_cache.flatten(0, 1)[slots].transpose(0, 1)  # [kv_heads, context, head_dim]
        v_seq = v_cache.flatten(0, 1)[slots].transpose(0, 1)
        out[start:end] = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k_seq, v_seq, attn_mask=mask,
                                                        scale=scale, enable_gqa=True).transpose(0, 1)
    return out


def sequences_of(block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, block_size: int):
    """For each sequence with new tokens: (start, end) of its rows, the cache slots of its whole context in order
    (block * block_size + offset), and its attention mask: none for a single new token, causal offset by the cached
    context otherwise. Host loop (the reference ops' CPU path)."""
    starts, contexts = query_start.tolist(), seq_lens.tolist()
    offsets = torch.arange(block_size, device=block_table.device)
    for s, context in enumerate(contexts):
        start, end = starts[s], starts[s + 1]
        new = end - start
        if new == 0:
            continue
        blocks = block_table[s, :-(-context // block_size)].long()
        slots = (blocks[:, None] * block_size + offsets).flatten()[:context]
        mask = None if new == 1 else torch.ones(new, context, dtype=torch.bool, device=block_table.device).tril(
            context - new)
        yield start, end, slots, mask


@dataclass(frozen=True)
class AttentionLaunch:
    """Tile sizes and grid shape of one paged-attention launch (choose_launch picks them; tests and tuning runs
    may pass their own)."""
    block_q: int  # new tokens of one sequence per program
    block_n: int  # keys per inner-loop step
    num_splits: int  # programs per (query tile, kv head) over disjoint key ranges, combined by a second kernel
    num_warps: int
    num_stages: int


# A decode program streams one (sequence, kv head)'s keys and values with one key tile in flight at a time (Triton's
# pipeliner prefetches the next tile's block ids, not the tile), so it moves a tile per memory round trip and the
# bandwidth comes from several programs per multiprocessor: 4 fit (about 125 registers a thread, 40 KB of shared
# memory). With fewer sequences x kv heads than 4 per multiprocessor, each sequence's keys are split over several
# programs (flash-decoding) and a second kernel combines their partial results.
_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 16
_MIN_KEYS_PER_SPLIT = 512  # a few tiles per program, so that its prologue and partial results stay small
_DECODE_TILE_BYTES = 16 * 1024  # of K (and as much of V) per inner step: 64 keys of a bf16 head of 128
_PREFILL_ROWS = 64  # rows (tokens x query heads of a group) per prefill tile: one warpgroup's MMA


def choose_launch(num_tokens: int, num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                  max_query_len: int, max_context: int, num_sms: int, element_bytes: int = 2) -> AttentionLaunch:
    """Tiles and split count from host-known sizes only (max_context is the block table's capacity, a bound), so
    the same launch is replayed by a CUDA graph whatever the sequences' lengths."""
    group_pad = triton.next_power_of_2(num_q_heads // num_kv_heads)
    dim_pad = triton.next_power_of_2(head_dim)
    if max_query_len <= 1:
        block_q, num_tiles = 1, num_seqs
        block_n = max(16, min(128, _DECODE_TILE_BYTES // (dim_pad * element_bytes)))
        num_stages = 3  # 3: the next tile's block ids load during this tile
    else:
        block_q = max(1, min(_PREFILL_ROWS // group_pad, triton.next_power_of_2(max_query_len)))
        num_tiles = min(num_tokens // block_q + num_seqs, num_seqs * -(-max_query_len // block_q))
        block_n = 64 if dim_pad * element_bytes <= 256 else 32  # K and V double-buffered within shared memory
        num_stages = 2
    programs = num_tiles * num_kv_heads
    num_splits = 1
    while (num_splits < _MAX_SPLITS and programs * num_splits < _PROGRAMS_PER_SM * num_sms
           and max_context >= 2 * num_splits * _MIN_KEYS_PER_SPLIT):
        num_splits *= 2
    return AttentionLaunch(block_q=block_q, block_n=block_n, num_splits=num_splits, num_warps=4,
                           num_stages=num_stages)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: pretend to be an H200 so that the launch matches the GPU's
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _sequence_of_tile(query_start_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles include `tile`: sequence s's tiles start at query_start[s] // BLOCK_Q + s,
    an increasing bound that leaves room for each sequence's last partial tile, so a binary search finds it."""
    lo: tl.int32 = 0
    hi = num_seqs
    while hi - lo > 1:  # tiles of sequence lo start at or before `tile`, those of sequence hi after it
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _split_range(kv_end, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of the split-th of NUM_SPLITS programs over keys 0..kv_end: equal shares in whole tiles of
    BLOCK_N, so the last shares may be short or empty (the whole range for one split)."""
    share = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * share
    return lo, tl.minimum(kv_end, lo + share)


@triton.jit
def _paged_keys(block_table_ptr, seq, stride_table, start, kv_hi, BLOCK_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Where keys start..start+BLOCK_N of sequence seq lie in a paged cache: (their positions, which of them are
    below kv_hi, their cache blocks, their offsets in the blocks)."""
    key_pos = start + tl.arange(0, BLOCK_N)
    key_real = key_pos < kv_hi
    block = tl.load(block_table_ptr + seq * stride_table + key_pos // BLOCK_SIZE, mask=key_real, other=0)
    return key_pos, key_real, block.to(tl.int64), key_pos % BLOCK_SIZE  # block * stride may pass 2**31 elements


@triton.jit(do_not_specialize=["num_seqs", "stride_table"])  # step-dependent: no variant per value (see norm.py)
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
        block_table_ptr, seq_lens_ptr, query_start_ptr, num_seqs, num_q_heads, scale_log2,
        stride_q_token, stride_q_head, stride_k_block, stride_k_offset, stride_k_head,
        stride_v_block, stride_v_offset, stride_v_head, stride_out_token, stride_out_head, stride_table,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr, DOT_PRECISION: tl.constexpr, P_PARTS: tl.constexpr,
        COPIES: tl.constexpr):
    """One program: BLOCK_Q new tokens of one sequence x the GROUP query heads of one kv head (BLOCK_M rows, so
    each key tile is loaded once for the whole group), over the split-th share of the keys those tokens see.

    P_PARTS (bf16/fp16: softmax_parts): the softmax weights enter the P.V product as that many 16-bit parts, each
    what rounding left out of the ones before; 3 keep 24 of their bits (float32's all), where FlashAttention keeps 8.
    The torch reference (SDPA) computes attention in float32: rounding the weights to 8 bits set 2% of the shipped
    model's bf16 argmaxes apart from it, to 16 bits 1.1%, to 24 bits 0.7% (RESULTS.md, sixteenth session). COPIES
    (decode, whose few rows leave most of the 16-row MMA tile empty): the group's rows appear once per part, copy c
    carrying part c, and one product serves them all; otherwise a product per part."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one token per sequence: a program per sequence
        seq = tile
        q_tile = 0
    else:
        seq = _sequence_of_tile(query_start_ptr, tile, num_seqs, BLOCK_Q)
        q_tile = tile - (tl.load(query_start_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:  # a padding sequence, or past this sequence's last tile
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_new_pos = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)  # row = (copy * BLOCK_Q + token) * GROUP_PAD + query head within the group
    q_index = q_tile * BLOCK_Q + rows // GROUP_PAD % BLOCK_Q
    head = kv_head * GROUP + rows % GROUP_PAD
    row_real = (rows // GROUP_PAD < COPIES * BLOCK_Q) & (q_index < q_len) & (rows % GROUP_PAD < GROUP)
    row_pos = first_new_pos + q_index
    dims = tl.arange(0, DIM_PAD)
    dim_real = dims < HEAD_DIM
    q = tl.load(q_ptr + (q_start + q_index)[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
                mask=row_real[:, None] & dim_real[None, :], other=0.0)

    # keys this tile sees: up to its last token's position; this program takes the split-th share of them
    kv_end = first_new_pos + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
    kv_lo, kv_hi = _split_range(kv_end, split, NUM_SPLITS, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores, in log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        key_pos, key_real, block, offset = _paged_keys(block_table_ptr, seq, stride_table, start, kv_hi, BLOCK_SIZE,
                                                       BLOCK_N)
        kv_mask = key_real[:, None] & dim_real[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * stride_k_block + offset[:, None] * stride_k_offset
                    + kv_head * stride_k_head + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = (key_pos[None, :] <= row_pos[:, None]) & key_real[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # a row that has seen no visible key yet (causal rows at a split's start) keeps exp2 away from -inf - -inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        v = tl.load(v_cache_ptr + block[:, None] * stride_v_block + offset[:, None] * stride_v_offset
                    + kv_head * stride_v_head + dims[None, :], mask=kv_mask, other=0.0)
        p_high = p.to(v.dtype)
        if P_PARTS > 1:
            rest = p - p_high.to(tl.float32)
            p_mid = rest.to(v.dtype)
            p_low = (rest - p_mid.to(tl.float32)).to(v.dtype)
        if COPIES > 1:  # copy c's rows take part c: what rounding left out of the copies before it
            copy_of_row = (rows // GROUP_PAD)[:, None]
            parts = tl.where(copy_of_row == 0, p_high, p_mid)
            if COPIES == 3:
                parts = tl.where(copy_of_row == 2, p_low, parts)
            pv = tl.dot(parts, v, input_precision=DOT_PRECISION)
        else:
            pv = tl.dot(p_high, v, input_precision=DOT_PRECISION)
            if P_PARTS > 1:
                pv = tl.dot(p_mid, v, pv, input_precision=DOT_PRECISION)
            if P_PARTS > 2:
                pv = tl.dot(p_low, v, pv, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    if COPIES > 1:  # fold the copies: [copies, GROUP_PAD] rows, the parts summed, the rest dropped
        copy = rows // GROUP_PAD
        acc = tl.sum(tl.reshape(tl.where((copy < COPIES)[:, None], acc, 0.0), (BLOCK_M // GROUP_PAD, GROUP_PAD,
                                                                                DIM_PAD)), 0)
        m_i = tl.max(tl.reshape(tl.where(copy == 0, m_i, float("-inf")), (BLOCK_M // GROUP_PAD, GROUP_PAD)), 0)
        l_i = tl.sum(tl.reshape(tl.where(copy == 0, l_i, 0.0), (BLOCK_M // GROUP_PAD, GROUP_PAD)), 0)
        head = kv_head * GROUP + tl.arange(0, GROUP_PAD)
        q_index = q_tile * BLOCK_Q + tl.arange(0, GROUP_PAD) * 0
        row_real = (tl.arange(0, GROUP_PAD) < GROUP) & (q_index < q_len)
    token = q_start + q_index
    store_mask = row_real[:, None] & dim_real[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_out_token + head[:, None] * stride_out_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:  # partials [T, q_heads, NUM_SPLITS, (DIM_PAD)]; an empty share stores max -inf, sum 0, acc 0
        part = (token * num_q_heads + head) * NUM_SPLITS + split
        tl.store(part_max_ptr + part, m_i, mask=row_real)
        tl.store(part_sum_ptr + part, l_i, mask=row_real)
        tl.store(part_acc_ptr + part[:, None] * DIM_PAD + dims[None, :], acc, mask=store_mask)


@triton.jit
def _combine_splits_kernel(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, num_q_heads,
                           stride_out_token, stride_out_head, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                           NUM_SPLITS: tl.constexpr):
    """out[token, head] from the splits' (max, sum, unnormalised acc): rescale each to the common max and divide."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    part = (token * num_q_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, DIM_PAD)
    part_max = tl.load(part_max_ptr + part)  # all -inf for a row no sequence owns (the buffer starts so)
    top = tl.max(part_max, 0)
    weight = tl.exp2(part_max - tl.where(top == float("-inf"), 0.0, top))  # 0 for empty shares
    # sums and accs of unwritten rows are uninitialised memory: select rather than multiply by a 0 weight
    part_sum = tl.where(weight > 0.0, tl.load(part_sum_ptr + part), 0.0)
    part_acc = tl.where(weight[:, None] > 0.0, tl.load(part_acc_ptr + part[:, None] * DIM_PAD + dims[None, :]), 0.0)
    total = tl.sum(part_sum * weight, 0)
    out = tl.sum(part_acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_out_token + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def softmax_parts(element_size: int, decode: bool, group_pad: int, block_m: int,
                  fixed: int | None = None) -> tuple[int, int]:
    """(parts, copies) of the kernel's P.V product: the softmax weights as P_PARTS 16-bit parts for 16-bit inputs
    (float32: one), each part a copy of the group's rows in a decode tile where the copies fit in its block_m rows.
    A decode tile too small for P_PARTS copies keeps as many as fit, at least 2: a product per part there cost
    Qwen3's groups of 8 16-19% of their decode time (RESULTS.md, sixteenth session). `fixed`: that many parts
    wherever, to measure them (benchmarks/attention_p_parts.py)."""
    if element_size != 2:
        return 1, 1
    parts = fixed or (P_PARTS if not decode or P_PARTS * group_pad <= block_m else max(2, block_m // group_pad))
    return parts, parts if decode and parts * group_pad <= block_m else 1


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int, scale: float,
                           launch: AttentionLaunch | None = None) -> torch.Tensor:
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs, max_blocks = block_table.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q_heads ({num_q_heads}) must be a multiple of kv_heads ({num_kv_heads})")
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim} is not supported (at most 256)")
    if q.stride(-1) != 1:
        raise ValueError(f"q needs a contiguous head_dim, got strides {q.stride()}")
    if seq_lens.shape != (num_seqs,) or query_start.shape != (num_seqs + 1,):
        raise ValueError(f"seq_lens must be [{num_seqs}] and query_start [{num_seqs + 1}], got "
                         f"{tuple(seq_lens.shape)} and {tuple(query_start.shape)}")
    if launch is None:
        launch = choose_launch(num_tokens, num_seqs, num_q_heads, num_kv_heads, head_dim, max_query_len,
                               max_blocks * block_size, _num_sms(q.device), q.element_size())
    decode = max_query_len <= 1  # 0: every sequence is padding
    if decode and launch.block_q != 1:
        raise ValueError(f"a decode step (max_query_len 1) takes block_q 1, got {launch}")
    if any(n & (n - 1) for n in (launch.block_q, launch.block_n, launch.num_splits)) or launch.block_n < 16:
        raise ValueError(f"block_q, block_n and num_splits must be powers of two, block_n at least 16: {launch}")
    if num_tokens == 0 or num_seqs == 0:
        return torch.zeros_like(q)

    group = num_q_heads // num_kv_heads
    group_pad, dim_pad = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    block_m = max(16, launch.block_q * group_pad)  # tl.dot needs at least 16 rows
    parts, copies = softmax_parts(q.element_size(), decode, group_pad, block_m)
    num_tiles = num_seqs if decode else num_tokens // launch.block_q + num_seqs
    splits = launch.num_splits
    if splits == 1:
        out = torch.zeros_like(q)  # rows no sequence owns stay zero
        part_acc = part_max = part_sum = out  # unused
    else:
        out = torch.empty_like(q)  # the combine kernel writes every row
        part_max = torch.full((num_tokens, num_q_heads, splits), float("-inf"), dtype=torch.float32, device=q.device)
        part_sum = torch.empty((num_tokens, num_q_heads, splits), dtype=torch.float32, device=q.device)
        part_acc = torch.empty((num_tokens, num_q_heads, splits, dim_pad), dtype=torch.float32, device=q.device)
    _paged_attention_kernel[(num_tiles, num_kv_heads, splits)](
        q, k_cache, v_cache, out, part_acc, part_max, part_sum, block_table, seq_lens, query_start,
        num_seqs, num_q_heads, scale * _LOG2_E, q.stride(0), q.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], out.stride(0), out.stride(1), block_table.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_SIZE=block_size,
        BLOCK_Q=launch.block_q, BLOCK_M=block_m, BLOCK_N=launch.block_n, NUM_SPLITS=splits, DECODE=decode,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        P_PARTS=parts, COPIES=copies,
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    if splits > 1:
        _combine_splits_kernel[(num_tokens, num_q_heads)](
            part_acc, part_max, part_sum, out, num_q_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, DIM_PAD=dim_pad, NUM_SPLITS=splits, num_warps=4)
    return out

