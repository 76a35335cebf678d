"""The experts of one MoE layer on one node, in a single call: sum over each token's (expert, weight) pairs
that this node holds of weight * down(silu(gate(x)) * up(x)); pairs it does not hold contribute nothing.

Three backends behind one signature: a plain-torch reference (the CPU path and the oracle), torch._grouped_mm
over the pairs sorted by expert, and two Triton kernels over an expert-sorted block layout. The GPU backends
neither loop over experts in Python nor wait on the device, so a CUDA graph can capture them."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("reference", "grouped_mm", "triton")

# What backend="auto" runs on CUDA, per dtype (on CPU it runs the reference). Triton to start with: it is
# capturable in every dtype and at any size, while torch._grouped_mm's sync-free CUTLASS path takes bf16 on
# sm90/sm100 only (other dtypes go through a fallback that copies the group offsets to the host) and wants
# 16-byte aligned rows. Flip bfloat16 to "grouped_mm" if it measures faster on the H200.
CUDA_AUTO_BACKEND: dict[torch.dtype, str] = {torch.bfloat16: "triton", torch.float16: "triton",
                                             torch.float32: "triton"}

_ALIGN_BYTES = 16  # torch._grouped_mm (TMA underneath) wants row strides that are multiples of 16 bytes


def _padded_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised tensor of `shape` whose rows start 16 bytes apart (a view of a wider one when the last
    size is not a multiple of 16 bytes), so that torch._grouped_mm accepts it whatever the model's sizes."""
    align = _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    last = shape[-1]
    wide = -(-last // align) * align
    return torch.empty(*shape[:-1], wide, dtype=dtype, device=device)[..., :last]


@dataclass
class StackedExperts:
    """One layer's experts held by one node, stacked at load so that one kernel reads any of them."""
    gate_up: torch.Tensor  # [local_experts, 2 * inter, hidden]: gate rows, then up rows (one matmul for both)
    down: torch.Tensor  # [local_experts, hidden, inter]
    local_index: torch.Tensor  # [num_experts] int32: global expert id -> row in the stacks, -1 where not held
    expert_ids: list[int]  # the global ids held, in stack order

    @property
    def hidden(self) -> int:
        return self.gate_up.shape[2]

    @property
    def inter(self) -> int:
        return self.down.shape[2]

    @classmethod
    def empty(cls, expert_ids: list[int], num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
              device: torch.device | str) -> StackedExperts:
        """Uninitialised stacks for `expert_ids`, to be filled row by row (a loader copies each checkpoint
        tensor straight into its place, so a node never holds its experts twice)."""
        if len(set(expert_ids)) != len(expert_ids) or any(not 0 <= e < num_experts for e in expert_ids):
            raise ValueError(f"expert ids {expert_ids} must be distinct and in [0, {num_experts})")
        local_index = torch.full((num_experts,), -1, dtype=torch.int32)
        local_index[torch.tensor(expert_ids, dtype=torch.long)] = torch.arange(len(expert_ids), dtype=torch.int32)
        return cls(gate_up=_padded_empty((len(expert_ids), 2 * inter, hidden), dtype, device),
                   down=_padded_empty((len(expert_ids), hidden, inter), dtype, device),
                   local_index=local_index.to(device), expert_ids=list(expert_ids))


def stack_experts(experts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  num_experts: int) -> StackedExperts:
    """{global expert id: (gate [inter, hidden], up [inter, hidden], down [hidden, inter])} as one layer's
    stacks, in increasing expert id."""
    if not experts:
        raise ValueError("no experts to stack: their sizes are unknown")
    expert_ids = sorted(experts)
    first_gate = experts[expert_ids[0]][0]
    inter, hidden = first_gate.shape
    stacked = StackedExperts.empty(expert_ids, num_experts, hidden, inter, first_gate.dtype, first_gate.device)
    for row, expert in enumerate(expert_ids):
        gate, up, down = experts[expert]
        stacked.gate_up[row, :inter].copy_(gate)
        stacked.gate_up[row, inter:].copy_(up)
        stacked.down[row].copy_(down)
    return stacked


def _local_rows(expert_ids: torch.Tensor, local_index: torch.Tensor) -> torch.Tensor:
    """[tokens, k] row in the stacks of each pair's expert, -1 where the pair is skipped (id -1), the expert is
    held elsewhere, or the id is out of range (clamped before the lookup: no device-side assert to kill the
    process; the placement handshake is what guarantees that ids are meaningful)."""
    num_experts = local_index.shape[0]
    known = (expert_ids >= 0) & (expert_ids < num_experts)
    rows = local_index[expert_ids.clamp(0, num_experts - 1).long()]
    return torch.where(known, rows, -1).long()


def fused_moe_reference(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                        experts: StackedExperts) -> torch.Tensor:
    """x [tokens, hidden]; expert_ids [tokens, k] global ids (-1: skip); expert_weights [tokens, k] float32.
    One loop over the held experts, rounding as transformers does: each expert's output in x.dtype, times its
    weight cast to x.dtype, added up expert by expert."""
    out = torch.zeros_like(x)
    rows_of_pairs = _local_rows(expert_ids, experts.local_index)
    for row in range(len(experts.expert_ids)):
        tokens, picks = torch.nonzero(rows_of_pairs == row, as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate, up = (x[tokens] @ experts.gate_up[row].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ experts.down[row].T
        out.index_add_(0, tokens, y * expert_weights[tokens, picks].unsqueeze(-1).to(y.dtype))
    return out


def fused_moe(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, experts: StackedExperts,
              backend: str = "auto", config: TritonMoeConfig | None = None) -> torch.Tensor:
    """fused_moe_reference's result, by `backend`: "reference", "grouped_mm", "triton", or "auto" (the
    reference on CPU, CUDA_AUTO_BACKEND[x.dtype] on CUDA). `config` sets the Triton tiles (choose_config's
    by default)."""
    if backend == "auto":
        backend = CUDA_AUTO_BACKEND.get(x.dtype, "triton") if x.is_cuda else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown fused MoE backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend == "reference":
        return fused_moe_reference(x, expert_ids, expert_weights, experts)
    if x.shape[0] == 0 or not experts.expert_ids:  # nothing to compute; sizes are host-known, no sync
        return torch.zeros_like(x)
    if backend == "grouped_mm":
        return _fused_moe_grouped_mm(x, expert_ids, expert_weights, experts)
    return _fused_moe_triton(x, expert_ids, expert_weights, experts, config)


def _sort_pairs(rows_of_pairs: torch.Tensor, num_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The [tokens * k] pairs ordered by stack row, skipped ones last: (row of each pair with skipped ones as
    num_local, pair ids in that order, pairs per row). Counts by scatter_add: bincount would wait on the device."""
    key = torch.where(rows_of_pairs >= 0, rows_of_pairs, num_local).reshape(-1)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return key, order, counts[:num_local]


def _rows_aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it whose rows start 16 bytes apart when t's do not (odd model sizes only)."""
    if t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % _ALIGN_BYTES == 0:
        return t
    aligned = _padded_empty(tuple(t.shape), t.dtype, t.device)
    aligned.copy_(t)
    return aligned


def _fused_moe_grouped_mm(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                          experts: StackedExperts) -> torch.Tensor:
    """Pairs sorted by expert, their token rows gathered, two torch._grouped_mm over the stacks, the rows put
    back in pair order and summed over each token's k. The grouped matmuls cover rows up to the last offset
    only: the skipped pairs' rows, sorted last, hold whatever the kernel left there, so they are dropped with
    torch.where (garbage times 0 could be NaN)."""
    for name, stack in (("gate_up", experts.gate_up), ("down", experts.down)):
        if stack.stride(2) != 1 or (stack.stride(1) * stack.element_size()) % _ALIGN_BYTES:
            raise ValueError(f"the {name} stack's rows are not 16-byte aligned (strides {stack.stride()}): "
                             f"build it with StackedExperts.empty or stack_experts")
    top_k, inter = expert_ids.shape[1], experts.inter
    num_local = len(experts.expert_ids)
    key, order, counts = _sort_pairs(_local_rows(expert_ids, experts.local_index), num_local)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    tokens = order // top_k
    rows = _rows_aligned(x[tokens])  # [pairs, hidden]
    h = torch._grouped_mm(rows, experts.gate_up.transpose(1, 2), offs=offsets)  # [pairs, 2 * inter]
    act = _rows_aligned(F.silu(h[:, :inter]) * h[:, inter:])
    y = torch._grouped_mm(act, experts.down.transpose(1, 2), offs=offsets)  # [pairs, hidden]
    weights = expert_weights.reshape(-1)[order].to(x.dtype)
    y = torch.where((key[order] < num_local).unsqueeze(-1), y * weights.unsqueeze(-1), 0)
    # back to (token, slot) order and summed over the slots: deterministic, where index_add_ on CUDA is atomic
    by_pair = torch.empty_like(y).index_copy_(0, order, y)
    return by_pair.view(x.shape[0], top_k, -1).sum(dim=1)


# --------------------------------------------------------------------------------------------------- Triton


@dataclass(frozen=True)
class MatmulTile:
    """Tiles of one of the two Triton launches (N: its output columns; K: its reduction)."""
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


@dataclass(frozen=True)
class TritonMoeConfig:
    """block_m: rows of one block, each expert's pairs padded to a multiple of it (both launches share it)."""
    block_m: int
    gate_up: MatmulTile
    down: MatmulTile


_PROGRAMS_WANTED = 1024  # ~8 per SM of the H200's 132: enough programs in flight to keep HBM streaming
_SHARED_BYTES = 200 * 1024  # of sm90's 227 KiB per block: pipeline stages must fit


@functools.cache  # pure, and asked once per layer and step
def choose_config(tokens: int, top_k: int, num_experts: int, hidden: int, inter: int,
                  dtype: torch.dtype = torch.bfloat16) -> TritonMoeConfig:
    """Tiles chosen from the sizes alone (autotuning would benchmark at CUDA-graph capture time).

    At decode an expert gets a few rows and the launch is bound by streaming its weights: block_m covers an
    expert's expected rows with headroom for routing imbalance (an expert that overflows one block has its
    weights read once per block), block_n is as wide as still gives enough programs to fill the GPU."""
    pairs = tokens * top_k
    per_expert = -(-pairs // max(num_experts, 1))
    block_m = next((m for m in (16, 32, 64) if 3 * per_expert <= 2 * m), 128)
    busy_blocks = min(pairs, num_experts) * -(-per_expert // block_m)
    element = torch.empty((), dtype=dtype).element_size()
    return TritonMoeConfig(block_m,
                           gate_up=_choose_tile(busy_blocks, inter, block_m, 2, element),
                           down=_choose_tile(busy_blocks, hidden, block_m, 1, element))


def _choose_tile(blocks: int, n: int, block_m: int, weight_tiles: int, element: int) -> MatmulTile:
    block_k = 128 if block_m <= 32 else 64  # long K strips when few rows share each weight tile
    widest = 64 if block_m >= 128 and weight_tiles == 2 else 128  # two fp32 accumulators must fit in registers
    block_n = next((b for b in (128, 64, 32) if b <= widest and blocks * -(-n // b) >= _PROGRAMS_WANTED), 32)
    num_stages = 4 if block_m <= 32 else 3

    def shared(stages: int, k: int) -> int:
        return stages * (block_m + weight_tiles * block_n) * k * element

    while num_stages > 2 and shared(num_stages, block_k) > _SHARED_BYTES:
        num_stages -= 1
    while block_k > 32 and shared(num_stages, block_k) > _SHARED_BYTES:
        block_k //= 2
    return MatmulTile(block_n, block_k, num_warps=8 if block_m >= 128 else 4, num_stages=num_stages)


def _expert_blocks(rows_of_pairs: torch.Tensor, num_local: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs laid out expert by expert, each expert's run padded to a multiple of block_m, computed on the
    device into buffers sized by the host-known bound sum_e ceil(n_e / block_m) * block_m
    <= pairs + min(pairs, experts) * (block_m - 1). Returns (sorted_pairs [blocks * block_m] int32: a pair id,
    or the pair count in padding; block_expert [blocks] int32: the stack row of each block, -1 past the last)."""
    num_pairs = rows_of_pairs.numel()
    device = rows_of_pairs.device
    key, order, counts = _sort_pairs(rows_of_pairs, num_local)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    first = torch.cumsum(counts, 0) - counts  # where each expert's pairs start in `order`
    sorted_key = key[order]
    expert = sorted_key.clamp(max=num_local - 1)
    position = padded_end[expert] - padded[expert] + torch.arange(num_pairs, device=device) - first[expert]
    capacity = block_m * -(-(num_pairs + min(num_pairs, num_local) * (block_m - 1)) // block_m)
    position = torch.where(sorted_key < num_local, position, capacity)  # skipped pairs land past the end
    sorted_pairs = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, position, order.to(torch.int32))
    block_start = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)  # first expert ending after the start
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return sorted_pairs[:capacity], block_expert


def _fused_moe_triton(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                      experts: StackedExperts, config: TritonMoeConfig | None) -> torch.Tensor:
    """gate_up launch (SiLU(gate) * up in its epilogue) into a [blocks * block_m, inter] intermediate, down
    launch (routing weight applied) into one row per pair, then the sum over each token's k pairs."""
    kernels = _triton_kernels()
    tokens, top_k = expert_ids.shape
    num_pairs, num_local = tokens * top_k, len(experts.expert_ids)
    hidden, inter = experts.hidden, experts.inter
    if experts.gate_up.stride(2) != 1 or experts.down.stride(2) != 1:
        raise ValueError("the expert stacks' rows must be contiguous")
    config = config or choose_config(tokens, top_k, num_local, hidden, inter, x.dtype)
    sorted_pairs, block_expert = _expert_blocks(_local_rows(expert_ids, experts.local_index), num_local,
                                                config.block_m)
    blocks = block_expert.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    routing = expert_weights.reshape(-1).to(torch.float32)
    # Triton's interpreter (CPU tensors) computes bf16 tl.dot wrongly (triton 3.6): it multiplies in float32
    # there, which gives the products a GPU's bf16 MMA accumulates in float32 anyway.
    dot_fp32 = not x.is_cuda
    precision = "ieee" if x.dtype == torch.float32 or dot_fp32 else "tf32"  # no silent TF32 for fp32 inputs
    act = torch.empty(blocks * config.block_m, inter, dtype=x.dtype, device=x.device)
    tile = config.gate_up
    kernels.gate_up[(blocks, -(-inter // tile.block_n))](
        x, experts.gate_up, act, sorted_pairs, block_expert, num_pairs, top_k,
        x.stride(0), experts.gate_up.stride(0), experts.gate_up.stride(1), act.stride(0),
        HIDDEN=hidden, INTER=inter, BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        EVEN_K=hidden % tile.block_k == 0, DOT_FP32=dot_fp32, PRECISION=precision,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    out_pairs = torch.zeros(num_pairs, hidden, dtype=x.dtype, device=x.device)  # skipped pairs stay 0
    tile = config.down
    kernels.down[(blocks, -(-hidden // tile.block_n))](
        act, experts.down, out_pairs, sorted_pairs, block_expert, routing, num_pairs,
        act.stride(0), experts.down.stride(0), experts.down.stride(1), out_pairs.stride(0),
        HIDDEN=hidden, INTER=inter, BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        EVEN_K=inter % tile.block_k == 0, DOT_FP32=dot_fp32, PRECISION=precision,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out_pairs.view(tokens, top_k, hidden).sum(dim=1)


@dataclass(frozen=True)
class _Kernels:
    gate_up: object
    down: object


@functools.cache
def _triton_kernels() -> _Kernels:
    """The kernels, defined on first use: triton is needed only when this backend runs (not a dependency of a
    CPU install), and triton.jit reads TRITON_INTERPRET when it decorates, after the test setup has set it."""
    import triton
    import triton.language as tl

    @triton.jit
    def gate_up_kernel(x_ptr, w_ptr, act_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs, top_k,
                       stride_x, stride_we, stride_wn, stride_act,
                       HIDDEN: tl.constexpr, INTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
                       PRECISION: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert < 0:
            return  # past the last expert's blocks: the grid is an upper bound
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_pairs_ptr + offs_m)
        row_ok = pairs < num_pairs
        # padding rows read token 0 (always there) instead of being masked; their results are never stored
        tokens = tl.where(row_ok, pairs // top_k, 0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = offs_n % INTER  # columns past the end read real rows; never stored
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tokens[:, None] * stride_x + offs_k[None, :]
        gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + offs_k[:, None]
        up_ptrs = gate_ptrs + INTER * stride_wn
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(HIDDEN, BLOCK_K)):
            if EVEN_K:  # no masks: the weight loads vectorise
                a = tl.load(x_ptrs)
                gate = tl.load(gate_ptrs)
                up = tl.load(up_ptrs)
            else:
                k_ok = offs_k < HIDDEN - k * BLOCK_K
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                gate = tl.load(gate_ptrs, mask=k_ok[:, None], other=0.0)
                up = tl.load(up_ptrs, mask=k_ok[:, None], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                gate = gate.to(tl.float32)
                up = up.to(tl.float32)
            acc_gate = tl.dot(a, gate, acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(a, up, acc_up, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        act_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_act + offs_n[None, :]
        tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < INTER))

    @triton.jit
    def down_kernel(act_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, routing_ptr, num_pairs,
                    stride_act, stride_we, stride_wn, stride_out,
                    HIDDEN: tl.constexpr, INTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
                    PRECISION: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert < 0:
            return
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_pairs_ptr + offs_m)
        row_ok = pairs < num_pairs
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = offs_n % HIDDEN
        offs_k = tl.arange(0, BLOCK_K)
        # the intermediate's padding rows were never written: masked, so no uninitialised values enter the dot
        act_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_act + offs_k[None, :]
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(INTER, BLOCK_K)):
            if EVEN_K:
                a = tl.load(act_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs)
            else:
                k_ok = offs_k < INTER - k * BLOCK_K
                a = tl.load(act_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            act_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        routing = tl.load(routing_ptr + pairs, mask=row_ok, other=0.0)
        acc = acc * routing[:, None]
        out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_out + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < HIDDEN))

    return _Kernels(gate_up=gate_up_kernel, down=down_kernel)
