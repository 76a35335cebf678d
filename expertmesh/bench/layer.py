"""`expertmesh bench layer`: one MoE layer's attention part and expert part at decode, against the floor.

Floor = max(bytes that must be read ÷ copy bandwidth, flops ÷ matmul peak), both measured on the same device
in the same run. Attention part: norm, qkv, rotary, KV write, paged attention over each sequence's context,
o_proj, norm, router; its bytes are the layer's attention weights and the KV cache up to each sequence's length.
Expert part: the fused MoE of the chosen experts; its bytes are the weights of the experts actually chosen. On
CUDA each part is captured in a CUDA graph and its replays timed with events, rotating over copies of the weights
and cache so that repeated runs do not read from L2."""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..cuda_graph import capture
from ..kv.metadata import build_step_metadata
from ..model.layers import attention
from ..model.rotary import RotaryTable
from ..model.spec import Rope
from ..ops.norm import add_rms_norm, rms_norm
from ..ops.router import route
from ..model.weights import GQAWeights, LayerWeights
from ..ops.fused_moe import StackedExperts, fused_moe


@dataclass(frozen=True)
class LayerShape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    inter: int
    top_k: int
    qk_norm: bool


SHAPES = {
    "mixtral": LayerShape("Mixtral-8x7B", 4096, 32, 8, 128, 8, 14336, 2, False),
    "qwen3": LayerShape("Qwen3-30B-A3B", 2048, 32, 4, 128, 128, 768, 8, True),
    "tiny": LayerShape("tiny", 256, 8, 2, 32, 16, 384, 2, False),  # for --device cpu
}


@dataclass
class Row:
    shape: str
    part: str  # attention | experts
    backend: str
    tokens: int
    context: int
    us: float
    floor_us: float
    bytes: int
    flops: int

    @property
    def ratio(self) -> float:
        return self.us / self.floor_us


def measure_ceilings(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, matmul flop/s) on random data."""
    cuda = device.startswith("cuda")
    n_bytes = (1 << 30) if cuda else (1 << 27)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = time_fn(lambda: dst.copy_(src), device, reps=20)
    m = 8192 if cuda else 1024
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    mm_s = time_fn(lambda: a @ b, device, reps=10)
    return 2 * n_bytes / copy_s, 2 * m ** 3 / mm_s


def time_fn(fn, device: str, reps: int = 50, warmup: int = 3) -> float:
    """Median seconds of one call (events on CUDA, the host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_graphed(fns: list, device: str, reps: int) -> float:
    """Median seconds of one call, cycling over fns (one per copy of the data); on CUDA each is a CUDA graph."""
    if not device.startswith("cuda"):
        calls = iter(range(10 ** 9))
        return time_fn(lambda: fns[next(calls) % len(fns)](), device, reps)
    pool = torch.cuda.graph_pool_handle()
    graphs = [capture(fn, pool)[0] for fn in fns]
    calls = iter(range(10 ** 9))
    return time_fn(lambda: graphs[next(calls) % len(graphs)].replay(), device, reps)


def _copies(bytes_per_copy: int, device: str) -> int:
    """Enough copies that cycling through them reads well past the L2 (about 4x a 60 MB L2)."""
    return 1 if not device.startswith("cuda") else max(1, min(8, math.ceil(240e6 / max(bytes_per_copy, 1))))


def bench_attention(shape: LayerShape, tokens: int, context: int, device: str, dtype: torch.dtype, bw: float,
                    peak: float, block_size: int = 16, reps: int = 50, backends=("auto",)) -> list[Row]:
    s = shape
    elt = torch.empty((), dtype=dtype).element_size()
    q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
    weight_params = (q_out + 2 * kv_out) * s.hidden + s.hidden * q_out + s.experts * s.hidden
    kv_bytes = tokens * context * 2 * kv_out * elt
    n_bytes = weight_params * elt + kv_bytes + 4 * tokens * s.hidden * elt
    flops = 2 * tokens * weight_params + 4 * tokens * context * s.heads * s.head_dim
    blocks_per_seq = math.ceil(context / block_size)
    rotary = RotaryTable(Rope(theta=1e6), s.head_dim, context, dtype, device)
    scale = 1 / math.sqrt(s.hidden)
    sets = []
    for _ in range(_copies(weight_params * elt + kv_bytes, device)):
        w = LayerWeights(
            input_norm=torch.ones(s.hidden, dtype=dtype, device=device),
            attention=GQAWeights(
                qkv_proj=torch.randn(q_out + 2 * kv_out, s.hidden, dtype=dtype, device=device) * scale,
                o_proj=torch.randn(s.hidden, q_out, dtype=dtype, device=device) / math.sqrt(q_out),
                q_norm=torch.ones(s.head_dim, dtype=dtype, device=device) if s.qk_norm else None,
                k_norm=torch.ones(s.head_dim, dtype=dtype, device=device) if s.qk_norm else None),
            post_attention_norm=torch.ones(s.hidden, dtype=dtype, device=device),
            router=torch.randn(s.experts, s.hidden, dtype=dtype, device=device) * scale, router_bias=None,
            dense_mlp=None, shared_mlp=None)
        shape_kv = (tokens * blocks_per_seq, block_size, s.kv_heads, s.head_dim)
        k_cache = torch.randn(shape_kv, dtype=dtype, device=device)
        v_cache = torch.randn(shape_kv, dtype=dtype, device=device)
        perm = torch.randperm(tokens * blocks_per_seq).tolist()  # scattered blocks, as a busy cache has them
        seqs = [(perm[i * blocks_per_seq:(i + 1) * blocks_per_seq], context - 1, 1) for i in range(tokens)]
        meta = build_step_metadata(seqs, block_size, device)
        h = torch.randn(tokens, s.hidden, dtype=dtype, device=device)
        sets.append((w, k_cache, v_cache, meta, h))

    def part(w, k_cache, v_cache, meta, h):
        x = rms_norm(h, w.input_norm, 1e-6)
        x, _ = add_rms_norm(attention(w.attention, x, meta, rotary, k_cache, v_cache, s.heads, s.kv_heads, s.head_dim, 1e-6), h,
                            w.post_attention_norm, 1e-6)
        return route(x, w.router, s.top_k, True)

    seconds = time_graphed([lambda args=args: part(*args) for args in sets], device, reps)
    floor = max(n_bytes / bw, flops / peak)
    return [Row(s.name, "attention", "ours", tokens, context, seconds * 1e6, floor * 1e6, n_bytes, flops)]


def bench_experts(shape: LayerShape, tokens: int, device: str, dtype: torch.dtype, bw: float, peak: float,
                  backends: tuple[str, ...], reps: int = 50) -> list[Row]:
    s = shape
    elt = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    experts = StackedExperts(
        gate_up=(torch.randn(s.experts, 2 * s.inter, s.hidden, generator=gen) / math.sqrt(s.hidden)).to(device, dtype),
        down=(torch.randn(s.experts, s.hidden, s.inter, generator=gen) / math.sqrt(s.inter)).to(device, dtype),
        local_index=torch.arange(s.experts, dtype=torch.int32, device=device), expert_ids=list(range(s.experts)))
    x = torch.randn(tokens, s.hidden, generator=gen).to(device, dtype)
    ids = torch.stack([torch.randperm(s.experts, generator=gen)[:s.top_k] for _ in range(tokens)]).to(device, torch.int32)
    weights = torch.softmax(torch.randn(tokens, s.top_k, generator=gen), -1).to(device)
    distinct = int(torch.unique(ids).numel())
    n_bytes = distinct * 3 * s.hidden * s.inter * elt + 2 * tokens * s.hidden * elt
    flops = 2 * tokens * s.top_k * 3 * s.hidden * s.inter
    floor = max(n_bytes / bw, flops / peak)
    rows = []
    for backend in backends:
        if backend == "reference":  # today's per-expert loop: host syncs, so not captured
            seconds = time_fn(lambda: fused_moe(x, ids, weights, experts, backend="reference"), device, min(reps, 10), 1)
        else:
            seconds = time_graphed([lambda: fused_moe(x, ids, weights, experts, backend=backend)], device, reps)
        rows.append(Row(s.name, "experts", backend, tokens, 0, seconds * 1e6, floor * 1e6, n_bytes, flops))
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'shape':<14} {'part':<9} {'backend':<10} {'tokens':>6} {'context':>7} {'us':>9} {'floor us':>9} {'x floor':>7}"]
    for r in rows:
        lines.append(f"{r.shape:<14} {r.part:<9} {r.backend:<10} {r.tokens:>6} {r.context or '-':>7} {r.us:>9.1f} "
                     f"{r.floor_us:>9.1f} {r.ratio:>7.2f}")
    return "\n".join(lines)


def main(args) -> int:
    device = args.device if args.device != "cuda" else "cuda:0"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    shapes = [SHAPES[name] for name in (args.shapes or ("mixtral,qwen3" if device != "cpu" else "tiny")).split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    backends = tuple(args.moe_backends.split(","))
    torch.manual_seed(0)
    with torch.no_grad():
        bw, peak = measure_ceilings(device, dtype)
        print(f"device {torch.cuda.get_device_name(device) if device != 'cpu' else 'cpu'}: copy {bw / 1e12:.2f} TB/s, "
              f"matmul {peak / 1e12:.1f} TFLOP/s ({args.dtype})", flush=True)
        rows: list[Row] = []
        for shape in shapes:
            for t in tokens:
                for c in contexts:
                    rows += bench_attention(shape, t, c, device, dtype, bw, peak, reps=args.reps)
                    print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
                rows += bench_experts(shape, t, device, dtype, bw, peak, backends, reps=args.reps)
                print("\n".join(format_rows(rows[-len(backends):]).splitlines()[1:]), flush=True)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"copy_bytes_per_s": bw, "matmul_flops_per_s": peak, "dtype": args.dtype,
                       "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}, handle, indent=1)
    return 0
