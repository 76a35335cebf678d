"""The Triton backend of fused_moe: its layout kernel (the pairs laid out expert by expert in blocks of block_m
rows), the two grouped matmuls (gate_up with SiLU(gate) * up in its epilogue, and down), the routing-weighted sum
over each token's k, and the choice of tiles from the sizes alone. Values are rounded to x.dtype where
fused_moe_reference's torch ops round them: the kernels agree with it as closely as float32 accumulation in another
order allows."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .fused_moe import StackedExperts, _local_rows, _sort_pairs

# Four launches, none of which waits on the device: expert_blocks lays the pairs out expert by expert, gate_up
# and down stream each busy expert's weights once per block of its rows, sum_over_k adds each token's rows.


@dataclass(frozen=True)
class MatmulTile:
    """Tiles of one of the two matmul launches (N: its output columns; K: its reduction)."""
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


_PROGRAMS_WANTED = 256  # about two per SM of the H200's 132: one streams weights while another drains
_SHARED_BYTES = 200 * 1024  # of sm90's 227 KiB per block: for the one block an SM holds with 64 rows or more
_SHARED_BYTES_TWO_PER_SM = 112 * 1024  # below 64 rows: two blocks per SM, one ramping up while the other streams
_PAIRS_PER_STEP = 4096  # pairs the layout kernel holds at once: every decode batch in one step


def block_rows(tokens: int, top_k: int, num_experts: int) -> int:
    """choose_config's block_m: rows of one block, covering an expert's expected rows with half again for routing
    imbalance. Every block is computed whole, padding rows included, so an expert past a multiple of it costs a
    block's math more (the planner's experts floor counts these rows: planner/perf.py)."""
    per_expert = -(-tokens * top_k // max(num_experts, 1))
    return next((m for m in (16, 32, 64) if 3 * per_expert <= 2 * m), 128)


@functools.cache  # pure, and asked once per layer and step
def choose_config(tokens: int, top_k: int, num_experts: int, hidden: int, inter: int,
                  dtype: torch.dtype = torch.bfloat16) -> TritonMoeConfig:
    """Tiles chosen from the sizes alone (autotuning would benchmark at CUDA-graph capture time);
    benchmarks/moe_sweep.py measures the alternatives.

    Both launches are bound by streaming the busy experts' weights, once per block of an expert's rows: block_m
    covers an expert's expected rows with headroom for routing imbalance (an expert that overflows one block has
    its weights read twice). The N tiles are as wide as still leaves about two programs per SM, but no narrower
    than block_m: every N tile reads its block's activations (block_m rows of K) again from L2, and narrow tiles
    over 128 rows read more activations than weights (Mixtral at 256 tokens ran at 2x the floor with 32-wide
    down tiles)."""
    pairs = tokens * top_k
    per_expert = -(-pairs // max(num_experts, 1))
    block_m = block_rows(tokens, top_k, num_experts)
    busy_blocks = min(pairs, num_experts) * -(-per_expert // block_m)
    element = torch.empty((), dtype=dtype).element_size()
    return TritonMoeConfig(block_m,
                           gate_up=_choose_tile(busy_blocks, inter, block_m, 2, element),
                           down=_choose_tile(busy_blocks, hidden, block_m, 1, element))


def _choose_tile(blocks: int, n: int, block_m: int, weight_tiles: int, element: int) -> MatmulTile:
    """weight_tiles: weight rows per output column (gate_up reads a gate and an up row for each)."""
    widest_rows = 128 if block_m <= 32 else 256  # weight rows per program
    narrowest = max(32, block_m // weight_tiles)
    widths = [b for b in (256, 128, 64, 32)  # and none twice as wide as the matrix (small test models)
              if narrowest <= b and weight_tiles * b <= widest_rows and (b < 2 * n or b == narrowest)]
    block_n = next((b for b in widths if blocks * -(-n // b) >= _PROGRAMS_WANTED), widths[-1])
    block_k = 128 if block_m <= 64 else 64  # long K strips when few rows share each weight tile
    num_stages = 4
    # two fp32 accumulators of 128 x 128 take 128 registers a thread over 8 warps, 256 over 4
    num_warps = 8 if block_m * weight_tiles * block_n >= 16384 else 4
    # Triton's wgmma path (64 rows a warp group) keeps num_stages buffers in shared memory, mma.sync one fewer
    mma_sync = block_m < 64
    limit = _SHARED_BYTES_TWO_PER_SM if mma_sync else _SHARED_BYTES

    def shared(stages: int, k: int) -> int:
        return (stages - mma_sync) * (block_m + weight_tiles * block_n) * k * element

    while shared(num_stages, block_k) > limit:
        if num_stages > 3:
            num_stages -= 1
        elif block_k > 64:
            block_k //= 2
        elif num_stages > 2:
            num_stages -= 1
        else:
            block_k //= 2
    return MatmulTile(block_n, block_k, num_warps, num_stages)


def _block_capacity(num_pairs: int, num_local: int, block_m: int) -> int:
    """Rows of the block layout, host-known: sum_e ceil(n_e / block_m) * block_m, bounded by
    num_pairs + min(num_pairs, experts) * (block_m - 1), rounded up to whole blocks."""
    return block_m * -(-(num_pairs + min(num_pairs, num_local) * (block_m - 1)) // block_m)


def expert_blocks_reference(expert_ids: torch.Tensor, local_index: torch.Tensor, num_local: int,
                            block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs laid out expert by expert in stack order, each expert's run padded to a multiple of block_m, in
    buffers of _block_capacity rows. Returns (sorted_pairs [capacity] int32: pair ids (token * k + slot),
    increasing within an expert, the pair count in padding and past the last expert; block_expert
    [capacity / block_m] int32: the stack row of each block, -1 past the last). Plain torch (an argsort and a
    dozen small kernels): the oracle of expert_blocks."""
    rows_of_pairs = _local_rows(expert_ids, local_index)
    num_pairs = rows_of_pairs.numel()
    device = rows_of_pairs.device
    key, order, counts = _sort_pairs(rows_of_pairs, num_local)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    first = torch.cumsum(counts, 0) - counts  # where each expert's pairs start in `order`
    sorted_key = key[order]
    expert = sorted_key.clamp(max=num_local - 1)
    position = padded_end[expert] - padded[expert] + torch.arange(num_pairs, device=device) - first[expert]
    capacity = _block_capacity(num_pairs, num_local, block_m)
    position = torch.where(sorted_key < num_local, position, capacity)  # skipped pairs land past the end
    sorted_pairs = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, position, order.to(torch.int32))
    block_start = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)  # first expert ending after the start
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return sorted_pairs[:capacity], block_expert


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def expert_blocks(expert_ids: torch.Tensor, local_index: torch.Tensor, num_local: int,
                  block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_blocks_reference's layout in one Triton launch: a program per held expert, and one for the tail."""
    num_pairs = expert_ids.numel()
    capacity = _block_capacity(num_pairs, num_local, block_m)
    device = expert_ids.device
    sorted_pairs = torch.empty(capacity, dtype=torch.int32, device=device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    if capacity == 0:
        return sorted_pairs, block_expert
    expert_ids = expert_ids if expert_ids.is_contiguous() else expert_ids.contiguous()
    # at least one element per thread of 4 warps: the histogram's lowering is simplest without replicas
    chunk = min(max(_next_power_of_2(num_pairs), 128), _PAIRS_PER_STEP)
    _triton_kernels().expert_blocks[(num_local + 1,)](
        expert_ids, local_index, sorted_pairs, block_expert, num_pairs, local_index.shape[0], num_local,
        capacity, capacity // block_m,
        BLOCK_M=block_m, CHUNK=chunk, NUM_BINS=max(32, _next_power_of_2(num_local)), num_warps=4)
    return sorted_pairs, block_expert


def _fused_moe_triton(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                      experts: StackedExperts, config: TritonMoeConfig | None) -> torch.Tensor:
    """The block layout; gate_up (SiLU(gate) * up in its epilogue) into a [blocks * block_m, inter]
    intermediate; down into one row per pair in x.dtype; each token's k rows weighted and added in float32. Neither
    the intermediate nor the pair rows are cleared: padding rows are never read, and the rows of skipped pairs are
    never added."""
    kernels = _triton_kernels()
    tokens, top_k = expert_ids.shape
    num_pairs, num_local = tokens * top_k, len(experts.expert_ids)
    hidden, inter = experts.hidden, experts.inter
    if experts.gate_up.stride(2) != 1 or experts.down.stride(2) != 1:
        raise ValueError("the expert stacks' rows must be contiguous")
    config = config or choose_config(tokens, top_k, num_local, hidden, inter, x.dtype)
    expert_ids = expert_ids if expert_ids.is_contiguous() else expert_ids.contiguous()
    expert_weights = expert_weights if expert_weights.is_contiguous() else expert_weights.contiguous()
    sorted_pairs, block_expert = expert_blocks(expert_ids, experts.local_index, num_local, config.block_m)
    blocks = block_expert.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
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
    pair_rows = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    tile = config.down
    kernels.down[(blocks, -(-hidden // tile.block_n))](
        act, experts.down, pair_rows, sorted_pairs, block_expert, num_pairs,
        act.stride(0), experts.down.stride(0), experts.down.stride(1), pair_rows.stride(0),
        HIDDEN=hidden, INTER=inter, BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        EVEN_K=inter % tile.block_k == 0, DOT_FP32=dot_fp32, PRECISION=precision,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    out = torch.empty_like(x)
    block_h = min(1024, _next_power_of_2(hidden))
    kernels.sum_over_k[(tokens, -(-hidden // block_h))](
        pair_rows, expert_ids, experts.local_index, expert_weights, out, experts.local_index.shape[0],
        pair_rows.stride(0), out.stride(0), HIDDEN=hidden, TOP_K=top_k, BLOCK_H=block_h, num_warps=4)
    return out


@dataclass(frozen=True)
class _Kernels:
    expert_blocks: object
    gate_up: object
    down: object
    sum_over_k: object


@functools.cache
def _triton_kernels() -> _Kernels:
    """The kernels, defined on first use: triton is needed only when this backend runs (not a dependency of a
    CPU install), and triton.jit reads TRITON_INTERPRET when it decorates, after the test setup has set it."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["num_pairs", "capacity", "num_blocks"])
    def expert_blocks_kernel(expert_ids_ptr, local_index_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs,
                             num_experts, num_local, capacity, num_blocks,
                             BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, NUM_BINS: tl.constexpr):
        # Every program counts all the pairs (a few thousand at decode: cheaper than a second launch or a
        # grid-wide wait), then program e < num_local places expert e's pairs, its padding and its blocks, and
        # program num_local marks everything past the last expert. The writes are disjoint: no atomics, and
        # pairs keep their order within an expert, so the layout is deterministic. The second pass reads the ids
        # again (from L1).
        program = tl.program_id(0)
        bins = tl.arange(0, NUM_BINS)
        counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
        for start in range(0, num_pairs, CHUNK):
            pairs = start + tl.arange(0, CHUNK)
            ids = tl.load(expert_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
            known = (ids >= 0) & (ids < num_experts)  # out-of-range ids are skipped, as by _local_rows
            rows = tl.load(local_index_ptr + tl.where(known, ids, 0), mask=known, other=-1).to(tl.int32)
            counts += tl.histogram(tl.where(rows >= 0, rows, 0), NUM_BINS, mask=rows >= 0)
        padded = tl.where(bins < num_local, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
        if program < num_local:
            count = tl.sum(tl.where(bins == program, counts, 0), 0)
            end = tl.sum(tl.where(bins <= program, padded, 0), 0)  # the experts before, and this one
            first = end - (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
            placed = program * 0
            for start in range(0, num_pairs, CHUNK):
                pairs = start + tl.arange(0, CHUNK)
                ids = tl.load(expert_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
                known = (ids >= 0) & (ids < num_experts)
                rows = tl.load(local_index_ptr + tl.where(known, ids, 0), mask=known, other=-1).to(tl.int32)
                mine = (rows == program).to(tl.int32)
                rank = tl.cumsum(mine, 0)  # 1 for the chunk's first pair of this expert
                tl.store(sorted_pairs_ptr + first + placed + rank - 1, pairs, mask=mine != 0)
                placed += tl.sum(mine, 0)
            pad = tl.arange(0, BLOCK_M)
            tl.store(sorted_pairs_ptr + first + count + pad, tl.full((BLOCK_M,), 0, tl.int32) + num_pairs,
                     mask=pad < end - first - count)
            for start in range(0, num_blocks, CHUNK):
                blocks = first // BLOCK_M + start + tl.arange(0, CHUNK)
                tl.store(block_expert_ptr + blocks, tl.full((CHUNK,), 0, tl.int32) + program,
                         mask=blocks < end // BLOCK_M)
        else:
            total = tl.sum(padded, 0)
            for start in range(0, capacity, CHUNK):
                rows_past = start + tl.arange(0, CHUNK)
                tl.store(sorted_pairs_ptr + rows_past, tl.full((CHUNK,), 0, tl.int32) + num_pairs,
                         mask=(rows_past >= total) & (rows_past < capacity))
            for start in range(0, num_blocks, CHUNK):
                blocks = start + tl.arange(0, CHUNK)
                tl.store(block_expert_ptr + blocks, tl.full((CHUNK,), -1, tl.int32),
                         mask=(blocks >= total // BLOCK_M) & (blocks < num_blocks))

    @triton.jit(do_not_specialize=["num_pairs"])
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
        # padding rows are masked (a mask constant along K keeps the loads vectorised): no memory traffic for them
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
            if EVEN_K:  # no masks along K: the weight loads vectorise
                a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                gate = tl.load(gate_ptrs)
                up = tl.load(up_ptrs)
            else:
                k_ok = offs_k < HIDDEN - k * BLOCK_K
                a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
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
        # rounded where the reference's torch ops round (no-ops in float32): the matmul's gate and up, silu(gate),
        # and the product at the store
        dtype = act_ptr.dtype.element_ty
        gate = acc_gate.to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
        act_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_act + offs_n[None, :]
        tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < INTER))

    @triton.jit(do_not_specialize=["num_pairs"])
    def down_kernel(act_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs,
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
        out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_out + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < HIDDEN))

    @triton.jit
    def sum_over_k_kernel(pair_rows_ptr, expert_ids_ptr, local_index_ptr, routing_ptr, out_ptr, num_experts,
                          stride_pair, stride_out,
                          HIDDEN: tl.constexpr, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
        # a pair's row was written iff expert_blocks placed the pair: the same test, so skipped pairs add nothing
        token = tl.program_id(0)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < HIDDEN
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for slot in tl.static_range(TOP_K):
            pair = token * TOP_K + slot
            expert = tl.load(expert_ids_ptr + pair)
            known = (expert >= 0) & (expert < num_experts)
            row = tl.load(local_index_ptr + tl.where(known, expert, 0))
            held = known & (row >= 0)
            y = tl.load(pair_rows_ptr + pair.to(tl.int64) * stride_pair + offs_h, mask=h_ok & held, other=0.0)
            # the pair's output as the matmul rounded it, weighted in float32: the reference's order
            acc += y.to(tl.float32) * tl.load(routing_ptr + pair).to(tl.float32)
        tl.store(out_ptr + token.to(tl.int64) * stride_out + offs_h, acc.to(out_ptr.dtype.element_ty), mask=h_ok)

    return _Kernels(expert_blocks=expert_blocks_kernel, gate_up=gate_up_kernel, down=down_kernel,
                    sum_over_k=sum_over_k_kernel)
