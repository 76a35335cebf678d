"""`expertmesh bench layer`: one MoE layer's attention part and expert part at decode, against the floor; with
--prefill-tokens, the same parts at prefill chunk sizes, run eagerly as the served prefill runs.

Floor = max(bytes that must be read ÷ copy bandwidth, flops ÷ matmul peak), both measured on the same device
in the same run. Attention part: norm, qkv (MLA: the low-rank q and the latent), rotary, KV write, paged attention
over each sequence's context, o_proj, norm, router and shared experts (DeepSeek: also timed alone, as "shared"); its
bytes are the layer's attention-node weights and the KV cache (MLA: the latents) up to each sequence's length.
Expert part: the fused MoE of the chosen experts; its bytes are the weights of the experts actually chosen. On
CUDA each part is captured in a CUDA graph and its replays timed with events, rotating over copies of the weights
and cache so that repeated runs do not read from L2. Prefill rows (parts "prefill_attention", "prefill_experts"):
a chunk of prompts of --prompt-len tokens each (the last one shorter), each attending causally to itself, and
the fused MoE of the chunk's tokens, both eager (no graph: the attention node runs prefills eagerly)."""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..cuda_graph import capture
from ..kv.cache import entry_layout
from ..kv.metadata import build_step_metadata
from ..model.layers import route_and_share, self_attention, swiglu
from ..model.rotary import RotaryTable
from ..model.shapes import shape as named_shape
from ..model.spec import ModelSpec
from ..model.weights import GQAWeights, LayerWeights, MLAWeights
from ..ops.fused_moe import StackedExperts, fused_moe
from ..ops.fused_moe_triton import block_rows
from ..ops.norm import add_rms_norm, rms_norm


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
    # the flops the kernel computes: the Triton fused MoE computes whole blocks of an expert's rows, padding included
    # (fused_moe_triton.block_rows); elsewhere the flops
    kernel_flops: int = 0

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


def time_cycled(fns: list, device: str, reps: int, warmup: int = 3) -> float:
    """Median seconds of one call, each call the next of fns (one per copy of the data)."""
    calls = iter(range(10 ** 9))
    return time_fn(lambda: fns[next(calls) % len(fns)](), device, reps, warmup)


def time_graphed(fns: list, device: str, reps: int) -> float:
    """time_cycled over fns; on CUDA each is a CUDA graph."""
    if not device.startswith("cuda"):
        return time_cycled(fns, device, reps)
    pool = torch.cuda.graph_pool_handle()
    return time_cycled([capture(fn, pool)[0].replay for fn in fns], device, reps)


def _copies(bytes_per_copy: int, device: str) -> int:
    """Enough copies that cycling through them reads past the cache a served layer misses, as a served step's
    layers, each with weights of its own, do: about 4x an H200's 60 MB L2; on CPU 4x a core's 2-4 MB L2 (the mini
    model's experts of one layer, 1.2 MB, timed 1282 us hot in L2 and 1683-1732 us over 6 copies, as served:
    RESULTS.md, twelfth session)."""
    cache_bytes = 240e6 if device.startswith("cuda") else 16e6
    return max(1, min(8, math.ceil(cache_bytes / max(bytes_per_copy, 1))))


def random_layer(spec: ModelSpec, dtype: torch.dtype, device: str) -> LayerWeights:
    """One MoE layer's attention-node weights (attention, router, shared experts), random at unit gain."""
    def linear(out_dim: int, in_dim: int, as_dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(out_dim, in_dim, dtype=as_dtype, device=device) / math.sqrt(in_dim)

    def ones(dim: int) -> torch.Tensor:
        return torch.ones(dim, dtype=dtype, device=device)

    hidden, heads, mla = spec.hidden_size, spec.num_heads, spec.mla
    if mla is None:
        q_out, kv_out = heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        attention = GQAWeights(qkv_proj=linear(q_out + 2 * kv_out, hidden), o_proj=linear(hidden, q_out),
                               q_norm=ones(spec.head_dim) if spec.qk_norm else None,
                               k_norm=ones(spec.head_dim) if spec.qk_norm else None)
    else:
        q_rank, q_out = mla.q_lora_rank, heads * mla.qk_head_dim
        attention = MLAWeights(
            q_proj=linear(q_out, hidden) if q_rank is None else None,
            q_a_proj=linear(q_rank, hidden) if q_rank else None, q_a_norm=ones(q_rank) if q_rank else None,
            q_b_proj=linear(q_out, q_rank) if q_rank else None,
            kv_a_proj=linear(mla.kv_lora_rank + mla.qk_rope_head_dim, hidden), kv_a_norm=ones(mla.kv_lora_rank),
            kv_b_proj=linear(heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank),
            o_proj=linear(hidden, heads * mla.v_head_dim))
    shared = spec.shared_intermediate_size
    sigmoid = spec.scoring == "sigmoid"  # DeepSeek keeps its router in float32, as transformers does
    return LayerWeights(
        input_norm=ones(hidden), attention=attention, post_attention_norm=ones(hidden),
        router=linear(spec.num_experts, hidden, torch.float32 if sigmoid else dtype),
        router_bias=torch.zeros(spec.num_experts, device=device) if sigmoid else None, dense_mlp=None,
        shared_mlp=(linear(2 * shared, hidden), linear(hidden, shared)) if shared else None)


def _tensors(weights) -> list[torch.Tensor]:
    """Every tensor of a weights dataclass, nested dataclasses and tuples included."""
    found = []
    for value in vars(weights).values() if hasattr(weights, "__dataclass_fields__") else weights:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif value is not None:
            found += _tensors(value)
    return found


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_attention(spec: ModelSpec, name: str, tokens: int, context: int, device: str, dtype: torch.dtype,
                    bw: float, peak: float, block_size: int = 16, reps: int = 50) -> list[Row]:
    """The attention node's part of one MoE layer at decode: norms, attention over each sequence's context, router
    and (DeepSeek) shared experts; and the shared experts alone, the price of running them there."""
    elt = torch.empty((), dtype=dtype).element_size()
    heads, dim, tensors = entry_layout(spec)
    kv_bytes = tokens * context * tensors * heads * dim * elt
    if spec.mla is None:
        attention_flops = 4 * tokens * context * spec.num_heads * spec.head_dim
    else:  # absorbed: scores over latent + rope key, values over the latent
        attention_flops = 2 * tokens * context * spec.num_heads * (2 * spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim)
    blocks_per_seq = math.ceil(context / block_size)
    rotary = RotaryTable(spec.rope, spec.head_dim, context, dtype, device)
    sets = []
    for _ in range(_copies(_bytes(_tensors(random_layer(spec, dtype, "meta"))) + kv_bytes, device)):
        w = random_layer(spec, dtype, device)
        caches = tuple(torch.randn(tokens * blocks_per_seq, block_size, heads, dim, dtype=dtype, device=device)
                       for _ in range(tensors))
        perm = torch.randperm(tokens * blocks_per_seq).tolist()  # scattered blocks, as a busy cache has them
        seqs = [(perm[i * blocks_per_seq:(i + 1) * blocks_per_seq], context - 1, 1) for i in range(tokens)]
        meta = build_step_metadata(seqs, block_size, device)
        sets.append((w, caches, meta, torch.randn(tokens, spec.hidden_size, dtype=dtype, device=device)))
    w = sets[0][0]
    n_bytes = _bytes(_tensors(w)) + kv_bytes + 4 * tokens * spec.hidden_size * elt
    matrix_params = sum(t.numel() for t in _tensors(w) if t.dim() == 2)
    flops = 2 * tokens * matrix_params + attention_flops
    eps = spec.rms_norm_eps

    def part(w, caches, meta, h):
        x = rms_norm(h, w.input_norm, eps)
        x, h = add_rms_norm(self_attention(w, x, meta, rotary, caches, spec), h, w.post_attention_norm, eps)
        return route_and_share(w, x, h, spec)

    seconds = time_graphed([lambda args=args: part(*args) for args in sets], device, reps)
    rows = [Row(name, "attention", "ours", tokens, context, seconds * 1e6, max(n_bytes / bw, flops / peak) * 1e6,
                n_bytes, flops)]
    if w.shared_mlp is not None:
        shared_bytes = _bytes(list(w.shared_mlp)) + 2 * tokens * spec.hidden_size * elt
        shared_flops = 2 * tokens * sum(t.numel() for t in w.shared_mlp)
        seconds = time_graphed([lambda args=args: swiglu(args[3], *args[0].shared_mlp) for args in sets], device, reps)
        rows.append(Row(name, "shared", "ours", tokens, 0, seconds * 1e6,
                        max(shared_bytes / bw, shared_flops / peak) * 1e6, shared_bytes, shared_flops))
    return rows


def prompt_lengths(chunk_tokens: int, prompt_len: int) -> list[int]:
    """A prefill chunk of chunk_tokens as whole prompts of prompt_len tokens, the last one shorter."""
    full, rest = divmod(chunk_tokens, prompt_len)
    return [prompt_len] * full + ([rest] if rest else [])


def bench_prefill_attention(spec: ModelSpec, name: str, tokens: int, prompt_len: int, device: str,
                            dtype: torch.dtype, bw: float, peak: float, block_size: int = 16,
                            reps: int = 10) -> list[Row]:
    """The attention node's part of one MoE layer for a prefill chunk of `tokens` new tokens (prompts of
    prompt_len, nothing cached), eager. Floor: the weights, the chunk's K/V written once and its activations;
    flops: the projections over every token and causal attention (a prompt's token i attends to i + 1 tokens)."""
    elt = torch.empty((), dtype=dtype).element_size()
    heads, dim, tensors = entry_layout(spec)
    prompts = prompt_lengths(tokens, prompt_len)
    causal_pairs = sum(p * (p + 1) // 2 for p in prompts)
    if spec.mla is None:
        attention_flops = 4 * causal_pairs * spec.num_heads * spec.head_dim
    else:
        attention_flops = 2 * causal_pairs * spec.num_heads * (2 * spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim)
    w = random_layer(spec, dtype, device)
    blocks = [math.ceil(p / block_size) for p in prompts]
    caches = tuple(torch.zeros(sum(blocks), block_size, heads, dim, dtype=dtype, device=device)
                   for _ in range(tensors))
    starts = [sum(blocks[:i]) for i in range(len(prompts))]
    meta = build_step_metadata([(list(range(s, s + b)), 0, p) for s, b, p in zip(starts, blocks, prompts)],
                               block_size, device)
    rotary = RotaryTable(spec.rope, spec.head_dim, prompt_len, dtype, device)
    h = torch.randn(tokens, spec.hidden_size, dtype=dtype, device=device)
    n_bytes = _bytes(_tensors(w)) + tokens * tensors * heads * dim * elt + 4 * tokens * spec.hidden_size * elt
    flops = 2 * tokens * sum(t.numel() for t in _tensors(w) if t.dim() == 2) + attention_flops
    eps = spec.rms_norm_eps

    def part():
        x = rms_norm(h, w.input_norm, eps)
        x, h2 = add_rms_norm(self_attention(w, x, meta, rotary, caches, spec), h, w.post_attention_norm, eps)
        return route_and_share(w, x, h2, spec)

    seconds = time_fn(part, device, reps, warmup=2)
    return [Row(name, "prefill_attention", "ours", tokens, prompt_len, seconds * 1e6,
                max(n_bytes / bw, flops / peak) * 1e6, n_bytes, flops)]


def bench_experts(spec: ModelSpec, name: str, tokens: int, device: str, dtype: torch.dtype, bw: float, peak: float,
                  backends: tuple[str, ...], reps: int = 50, prefill: bool = False) -> list[Row]:
    """The fused MoE of one layer for `tokens` tokens routed at random: graphed at decode, eager at prefill."""
    experts, hidden, inter, top_k = spec.num_experts, spec.hidden_size, spec.expert_intermediate_size, spec.top_k
    elt = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    sets = [StackedExperts(  # made on the device in its dtype: DeepSeek-V3's 256 experts are 22 GB in bf16
        gate_up=torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype) / math.sqrt(hidden),
        down=torch.randn(experts, hidden, inter, device=device, dtype=dtype) / math.sqrt(inter),
        local_index=torch.arange(experts, dtype=torch.int32, device=device), expert_ids=list(range(experts)))
        for _ in range(_copies(3 * experts * hidden * inter * elt, device))]
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(device, torch.int32)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1).to(device)
    distinct = int(torch.unique(ids).numel())
    n_bytes = distinct * 3 * hidden * inter * elt + 2 * tokens * hidden * elt
    flops = 2 * tokens * top_k * 3 * hidden * inter
    floor = max(n_bytes / bw, flops / peak)
    block = block_rows(tokens, top_k, experts)
    padded = int((torch.bincount(ids.flatten().long(), minlength=experts).add(block - 1) // block).sum()) * block
    rows = []
    for backend in backends:
        calls = [lambda stacked=stacked: fused_moe(x, ids, weights, stacked, backend=backend) for stacked in sets]
        if backend == "reference" or prefill:  # the reference's per-expert loop syncs the host: not captured
            seconds = time_cycled(calls, device, min(reps, 10), warmup=1)
        else:
            seconds = time_graphed(calls, device, reps)
        rows.append(Row(name, "prefill_experts" if prefill else "experts", backend, tokens, 0, seconds * 1e6,
                        floor * 1e6, n_bytes, flops,
                        kernel_flops=2 * padded * 3 * hidden * inter if backend == "triton" else flops))
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'shape':<14} {'part':<17} {'backend':<10} {'tokens':>6} {'context':>7} {'us':>9} {'floor us':>9} {'x floor':>7}"]
    for r in rows:
        lines.append(f"{r.shape:<14} {r.part:<17} {r.backend:<10} {r.tokens:>6} {r.context or '-':>7} {r.us:>9.1f} "
                     f"{r.floor_us:>9.1f} {r.ratio:>7.2f}")
    return "\n".join(lines)


def main(args) -> int:
    device = args.device if args.device != "cuda" else "cuda:0"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    names = (args.shapes or ("mixtral,qwen3" if device != "cpu" else "tiny")).split(",")
    # a named shape, or a checkpoint directory (its config.json): the CPU calibration times the served models' shapes
    shapes = [(Path(name).name, ModelSpec.from_dir(name)) if Path(name).is_dir() else named_shape(name)
              for name in names]
    tokens = [int(t) for t in args.tokens.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    backends = tuple(args.moe_backends.split(","))
    prefill_tokens = [int(t) for t in args.prefill_tokens.split(",")] if args.prefill_tokens else []
    torch.manual_seed(0)
    with torch.no_grad():
        bw, peak = measure_ceilings(device, dtype)
        print(f"device {torch.cuda.get_device_name(device) if device != 'cpu' else 'cpu'}: copy {bw / 1e12:.2f} TB/s, "
              f"matmul {peak / 1e12:.1f} TFLOP/s ({args.dtype})", flush=True)
        rows: list[Row] = []
        for name, spec in shapes:
            for t in tokens:
                new_rows = []
                if "attention" in args.parts:
                    for c in contexts:
                        new_rows += bench_attention(spec, name, t, c, device, dtype, bw, peak, reps=args.reps)
                if "experts" in args.parts:
                    new_rows += bench_experts(spec, name, t, device, dtype, bw, peak, backends, reps=args.reps)
                rows += new_rows
                print("\n".join(format_rows(new_rows).splitlines()[1:]), flush=True)
            for t in prefill_tokens:
                new_rows = []
                if "attention" in args.parts:
                    new_rows += bench_prefill_attention(spec, name, t, args.prompt_len, device, dtype, bw, peak,
                                                        reps=min(args.reps, 10))
                if "experts" in args.parts:
                    new_rows += bench_experts(spec, name, t, device, dtype, bw, peak, backends, reps=args.reps,
                                              prefill=True)
                rows += new_rows
                print("\n".join(format_rows(new_rows).splitlines()[1:]), flush=True)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"copy_bytes_per_s": bw, "matmul_flops_per_s": peak, "dtype": args.dtype,
                       "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}, handle, indent=1)
    return 0
