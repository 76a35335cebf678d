"""RMSNorm over the last dim of [rows, hidden] or [tokens, heads, head_dim] (Qwen3's per-head q/k norm), alone or
fused with the residual add before it: a plain-torch reference (CPU path and oracle) beside one Triton kernel."""
import torch

from .backend import pick_backend, tl, triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto") -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim, computed in float32 and rounded to x.dtype before the
    weight multiplies it (transformers' RMSNorm). x: 1 to 3 dims, any strides but a contiguous last dim; the result
    is contiguous, in the promoted dtype of x and weight."""
    if pick_backend(x.device, backend, "rms_norm") == "triton":
        return _rms_norm_triton(x, None, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h), h) of h = x + residual (vLLM's fused_add_rms_norm, out of place): a layer's output joins the
    residual stream and the next norm reads it in the same pass. h is in x.dtype, as `x + residual` gives it."""
    if pick_backend(x.device, backend, "add_rms_norm") == "triton":
        return _rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


# Triton compiles a variant apart for an integer argument equal to 1 or divisible by 16: sizes that change from
# step to step are not specialized, so that the variants a node loads at its warm-up are all it ever needs (a
# first load mid-serving stalls the step; next to a pending NCCL receive it can deadlock: m2n/link_plan.py).
@triton.jit(do_not_specialize=["num_rows", "inner"])
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, num_rows, inner, n, inv_n, eps,
                     stride_x_outer, stride_x_inner, stride_r_outer, stride_r_inner,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """ROWS rows of x seen as [outer, inner, n] (row = outer * inner + within), each whole in one tile; the outputs
    are contiguous [rows, n]. Every op rounds where the reference's separate torch ops do."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_real = rows < num_rows
    rows = rows.to(tl.int64)  # rows * stride may pass 2**31 elements in a long prefill
    cols = tl.arange(0, BLOCK)
    col_real = cols < n
    mask = row_real[:, None] & col_real[None, :]
    outer, within = rows // inner, rows % inner
    x = tl.load(x_ptr + (outer * stride_x_outer + within * stride_x_inner)[:, None] + cols[None, :], mask=mask,
                other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + (outer * stride_r_outer + within * stride_r_inner)[:, None] + cols[None, :],
                           mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(summed_ptr + rows[:, None] * n + cols[None, :], x, mask=mask)
    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, 1) * inv_n  # padded lanes hold 0
    normed = (x32 * tl.math.rsqrt(mean_sq + eps)[:, None]).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=col_real, other=0.0).to(tl.float32)
    out = weight[None, :] * normed.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


_MAX_HIDDEN = 65536  # one row per tile: 64K float32 values is already 32 registers a thread at 16 warps


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """[outer, inner, n] view of a 1-, 2- or 3-dim tensor, strides kept (no copy)."""
    if t.dim() not in (1, 2, 3):
        raise ValueError(f"rms_norm takes 1 to 3 dims, got shape {tuple(t.shape)}")
    while t.dim() < 3:
        t = t.unsqueeze(-2)
    return t


def _rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    if weight.shape != (n,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{n}], got shape {tuple(weight.shape)}, "
                         f"strides {weight.stride()}")
    if x.stride(-1) != 1:
        raise ValueError(f"x needs a contiguous last dim, got strides {x.stride()}")
    if n > _MAX_HIDDEN:
        raise ValueError(f"rows of {n} elements are not supported (at most {_MAX_HIDDEN})")
    x3 = _as_3d(x)
    r3 = x3  # unused without a residual
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1:
            raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}, contiguous last dim), got "
                             f"{tuple(residual.shape)}, {residual.dtype}, strides {residual.stride()}")
        r3 = _as_3d(residual)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    summed = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    outer, inner = x3.shape[:2]
    num_rows = outer * inner
    if num_rows == 0:
        return out, summed
    block = triton.next_power_of_2(n)
    rows_per_program = max(1, 1024 // block)  # short rows (a head) share a program; a hidden row fills one
    _rms_norm_kernel[(triton.cdiv(num_rows, rows_per_program),)](
        x3, r3, weight, out, summed if summed is not None else out, num_rows, inner, n, 1.0 / n, eps,
        x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1),
        BLOCK=block, ROWS=rows_per_program, HAS_RESIDUAL=residual is not None,
        num_warps=max(1, min(16, rows_per_program * block // 256)),
        enable_fp_fusion=False)  # x*x stays a rounded product, as torch's pow(2) stores it
    return out, summed
