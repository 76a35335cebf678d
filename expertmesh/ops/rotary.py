"""Rotary embedding of q and k (after Qwen3's per-head RMSNorm) and the KV-cache write of k and v, in one pass over
the qkv projection's output: a plain-torch reference (CPU path and oracle) beside one Triton kernel."""
import torch

from .attention import _check_cache, write_kv_reference
from .backend import pick_backend, tl, triton
from .norm import rms_norm_reference


def rotate_and_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                        num_kv_heads: int, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                        eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """Split qkv ([T, (num_heads + 2 num_kv_heads) * head_dim], rows may be strided) into q, k, v heads; RMSNorm each
    head of q and k when q_norm and k_norm ([head_dim]) are given; rotate q and k by their token's position
    (positions [T]; cos, sin [max_len, head_dim], each frequency's angle in both halves); store k and v at
    slot_mapping[t] (= block * block_size + offset; -1 skips the token) of the caches
    ([blocks, block_size, num_kv_heads, head_dim]). Returns the rotated q, [T, num_heads, head_dim] contiguous."""
    if (q_norm is None) != (k_norm is None):
        raise ValueError("give both q_norm and k_norm (Qwen3) or neither")
    args = (qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, q_norm, k_norm, eps)
    if pick_backend(qkv.device, backend, "rotate_and_write_kv") == "triton":
        return _rotate_and_write_kv_triton(*args)
    return rotate_and_write_kv_reference(*args)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of x [tokens, heads, head_dim] in x's dtype, as the tables are."""
    cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotate_and_write_kv_reference(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                  num_heads: int, num_kv_heads: int, q_norm: torch.Tensor | None,
                                  k_norm: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The separate ops the attention layer ran before this fusion, in the same order on the same values."""
    tokens, head_dim = qkv.shape[0], cos.shape[-1]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k, v = (q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim),
               v.view(tokens, num_kv_heads, head_dim))
    if q_norm is not None:
        q, k = rms_norm_reference(q, q_norm, eps), rms_norm_reference(k, k_norm, eps)
    q, k = apply_rotary_reference(q, cos, sin, positions), apply_rotary_reference(k, cos, sin, positions)
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    return q


@triton.jit
def _norm_and_rotate(x1, x2, norm_ptr, dims, dim_real, cos1, cos2, sin1, sin2, eps, HEAD_DIM: tl.constexpr,
                     QK_NORM: tl.constexpr):
    """The two halves ([heads, HALF_PAD] each, in the activations' dtype) of a tile of heads, normed (Qwen3) and
    rotated; each op rounds to that dtype where the reference's separate torch ops round."""
    dtype = x1.dtype
    if QK_NORM:
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        mean_sq = (tl.sum(a * a, 1) + tl.sum(b * b, 1)) * (1.0 / HEAD_DIM)  # padded lanes hold 0
        inv_rms = tl.math.rsqrt(mean_sq + eps)[:, None]
        w1 = tl.load(norm_ptr + dims, mask=dim_real, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_ptr + HEAD_DIM // 2 + dims, mask=dim_real, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (a * inv_rms).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (b * inv_rms).to(dtype).to(tl.float32)).to(dtype)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + cat(-x2, x1) * sin: -(b * sin1) is the rounded product (-b) * sin1, and adding it is subtracting
    out1 = (a * cos1).to(dtype).to(tl.float32) - (b * sin1).to(dtype).to(tl.float32)
    out2 = (b * cos2).to(dtype).to(tl.float32) + (a * sin2).to(dtype).to(tl.float32)
    return out1.to(dtype), out2.to(dtype)


@triton.jit
def _rotate_and_write_kv_kernel(
        qkv_ptr, positions_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
        slot_mapping_ptr, eps, stride_qkv, stride_cos, stride_sin, stride_kc_block, stride_kc_offset, stride_kc_head,
        stride_vc_block, stride_vc_offset, stride_vc_head,
        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
        Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, Q_PROGRAMS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        QK_NORM: tl.constexpr):
    """Program (token, c): for c < Q_PROGRAMS, q heads c * Q_HEADS.. of the token, into q_out; otherwise kv heads
    (c - Q_PROGRAMS) * KV_HEADS.., k rotated and v as is, into the caches at the token's slot."""
    token = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    half: tl.constexpr = HEAD_DIM // 2
    dims = tl.arange(0, HALF_PAD)
    dim_real = dims < half
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos1 = tl.load(cos_ptr + position * stride_cos + dims, mask=dim_real, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + position * stride_cos + half + dims, mask=dim_real, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + position * stride_sin + dims, mask=dim_real, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + position * stride_sin + half + dims, mask=dim_real, other=0.0).to(tl.float32)[None, :]
    row = qkv_ptr + token * stride_qkv
    if chunk < Q_PROGRAMS:
        heads = chunk * Q_HEADS + tl.arange(0, Q_HEADS)
        mask = (heads < NUM_HEADS)[:, None] & dim_real[None, :]
        src = row + heads[:, None] * HEAD_DIM + dims[None, :]
        out1, out2 = _norm_and_rotate(tl.load(src, mask=mask, other=0.0), tl.load(src + half, mask=mask, other=0.0),
                                      q_norm_ptr, dims, dim_real, cos1, cos2, sin1, sin2, eps, HEAD_DIM, QK_NORM)
        dst = q_out_ptr + (token * NUM_HEADS + heads[:, None]) * HEAD_DIM + dims[None, :]
        tl.store(dst, out1, mask=mask)
        tl.store(dst + half, out2, mask=mask)
    else:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:  # -1: a padding token, not stored
            heads = (chunk - Q_PROGRAMS) * KV_HEADS + tl.arange(0, KV_HEADS)
            mask = (heads < NUM_KV_HEADS)[:, None] & dim_real[None, :]
            k_src = row + (NUM_HEADS + heads[:, None]) * HEAD_DIM + dims[None, :]
            v_src = k_src + NUM_KV_HEADS * HEAD_DIM
            out1, out2 = _norm_and_rotate(tl.load(k_src, mask=mask, other=0.0),
                                          tl.load(k_src + half, mask=mask, other=0.0), k_norm_ptr, dims, dim_real,
                                          cos1, cos2, sin1, sin2, eps, HEAD_DIM, QK_NORM)
            block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
            k_dst = (k_cache_ptr + block * stride_kc_block + offset * stride_kc_offset
                     + heads[:, None] * stride_kc_head + dims[None, :])
            tl.store(k_dst, out1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_dst + half, out2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            v_dst = (v_cache_ptr + block * stride_vc_block + offset * stride_vc_offset
                     + heads[:, None] * stride_vc_head + dims[None, :])
            tl.store(v_dst, tl.load(v_src, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_dst + half, tl.load(v_src + half, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)


_MAX_HEADS_PER_PROGRAM = 8  # a program's tile: up to 8 heads x half a head_dim, twice


def _rotate_and_write_kv_triton(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                num_heads: int, num_kv_heads: int, q_norm: torch.Tensor | None,
                                k_norm: torch.Tensor | None, eps: float) -> torch.Tensor:
    head_dim = cos.shape[-1]
    tokens = qkv.shape[0]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [tokens, {width}] with a contiguous last dim, got {tuple(qkv.shape)}, "
                         f"strides {qkv.stride()}")
    if head_dim % 2 or cos.dim() != 2 or sin.shape != cos.shape or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError(f"cos and sin must both be [max_len, head_dim] (head_dim even) with a contiguous last dim, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if positions.shape != (tokens,) or slot_mapping.shape != (tokens,):
        raise ValueError(f"positions and slot_mapping must be [{tokens}], got {tuple(positions.shape)} and "
                         f"{tuple(slot_mapping.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    # the kernel rounds every op to one activations dtype; mixed dtypes would promote in the reference
    norms = [] if q_norm is None else [q_norm, k_norm]
    if any(t.dtype != qkv.dtype for t in (cos, sin, *norms)):
        raise ValueError(f"cos, sin and the q/k norms must be in qkv's dtype {qkv.dtype}, got "
                         f"{[t.dtype for t in (cos, sin, *norms)]}")
    if any(t.shape != (head_dim,) or t.stride(0) != 1 for t in norms):
        raise ValueError(f"q_norm and k_norm must be contiguous [{head_dim}], got {[tuple(t.shape) for t in norms]}")
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    q = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    half_pad = triton.next_power_of_2(head_dim // 2)
    q_heads = min(_MAX_HEADS_PER_PROGRAM, triton.next_power_of_2(num_heads))
    kv_heads = min(_MAX_HEADS_PER_PROGRAM, triton.next_power_of_2(num_kv_heads))
    q_programs, kv_programs = triton.cdiv(num_heads, q_heads), triton.cdiv(num_kv_heads, kv_heads)
    qk_norm = q_norm is not None
    _rotate_and_write_kv_kernel[(tokens, q_programs + kv_programs)](
        qkv, positions, cos, sin, q_norm if qk_norm else qkv, k_norm if qk_norm else qkv, q, k_cache, v_cache,
        slot_mapping, eps, qkv.stride(0), cos.stride(0), sin.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF_PAD=half_pad, Q_HEADS=q_heads,
        KV_HEADS=kv_heads, Q_PROGRAMS=q_programs, BLOCK_SIZE=k_cache.shape[1], QK_NORM=qk_norm,
        num_warps=max(1, min(8, q_heads * half_pad // 256)),
        enable_fp_fusion=False)  # a product and a sum stay two roundings (no FMA), as in torch's separate ops
    return q
