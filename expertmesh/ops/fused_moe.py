"""The experts of one MoE layer on one node, in a single call: sum over each token's (expert, weight) pairs
that this node holds of weight * down(silu(gate(x)) * up(x)); pairs it does not hold contribute nothing.

Three backends behind one signature: a plain-torch reference (the CPU path and the oracle), torch._grouped_mm
over the pairs sorted by expert, and four Triton launches (an expert-sorted block layout, gate_up, down, the
sum over each token's k: fused_moe_triton.py, imported when that backend first runs). The GPU backends neither
loop over experts in Python nor wait on the device, so a CUDA graph can capture them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # fused_moe_triton imports this module's StackedExperts: imported inside fused_moe at run time
    from .fused_moe_triton import TritonMoeConfig

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
    One loop over the held experts: each expert's output in x.dtype, weighted and summed over k in float32, rounded
    to x.dtype once. That is what the fused kernels do (the sum stays in registers); transformers rounds after
    every add instead, which in bf16 alone moved 1.5% of the shipped model's next-token argmaxes under teacher
    forcing (CPU, 16 prompts x 64 tokens; agreement with float32: 97.85% summed in float32, 97.75% per add).
    In float32 the two are the same."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    rows_of_pairs = _local_rows(expert_ids, experts.local_index)
    for row in range(len(experts.expert_ids)):
        tokens, picks = torch.nonzero(rows_of_pairs == row, as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate, up = (x[tokens] @ experts.gate_up[row].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ experts.down[row].T
        out.index_add_(0, tokens, y.float() * expert_weights[tokens, picks].unsqueeze(-1))
    return out.to(x.dtype)


def fused_moe(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, experts: StackedExperts,
              backend: str = "auto", config: TritonMoeConfig | None = None) -> torch.Tensor:
    """fused_moe_reference's result, by `backend`: "reference", "grouped_mm", "triton", or "auto" (the
    reference on CPU, CUDA_AUTO_BACKEND[x.dtype] on CUDA). `config` sets the Triton tiles
    (fused_moe_triton.choose_config's by default)."""
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
    from .fused_moe_triton import _fused_moe_triton
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
