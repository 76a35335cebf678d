"""The Triton fused MoE on a GPU against its memory floor, for choose_config's tiles and a few variants of each
launch's tiles: the numbers to tune expertmesh/ops/fused_moe_triton.py's choose_config by.

    python benchmarks/moe_sweep.py [--shapes mixtral,qwen3] [--tokens 1,16,64,256] [--budget-s 170] [--json out.json]

Floor: the weights of the experts the routing chose, read once at the copy bandwidth measured here (read + write of
a 1 GiB copy), bf16, all experts held; random top-k routing, as `expertmesh bench layer` uses. Each variant is one
fused_moe call captured in a CUDA graph and its replays timed with events. The variants of one launch keep the
other launch at choose_config's tiles, so each line says what that launch alone gains; the best of each is then
timed together. Past --budget-s the remaining points run choose_config's tiles only."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from expertmesh.bench.layer import time_fn
from expertmesh.cuda_graph import capture
from expertmesh.ops.fused_moe import StackedExperts, fused_moe
from expertmesh.ops.fused_moe_triton import MatmulTile, TritonMoeConfig, choose_config

SHAPES = {"mixtral": (8, 2, 4096, 14336), "qwen3": (128, 8, 2048, 768)}  # experts, top_k, hidden, inter
SHARED_BYTES = 227 * 1024  # sm90's most per block
ELEMENT = 2  # bf16


def copy_bandwidth() -> float:
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), "cuda", reps=20)
    return 2 * src.numel() * ELEMENT / seconds


def fits(block_m: int, tile: MatmulTile, weight_tiles: int) -> bool:
    """Shared memory (num_stages buffers with wgmma, 64 rows or more; one fewer with mma.sync) and fp32
    accumulators (at most 128 registers a thread)."""
    shared = (tile.num_stages - (block_m < 64)) * (block_m + weight_tiles * tile.block_n) * tile.block_k * ELEMENT
    return shared <= SHARED_BYTES and block_m * weight_tiles * tile.block_n <= 128 * 32 * tile.num_warps


def shrink_to_fit(tile: MatmulTile, block_m: int, weight_tiles: int) -> MatmulTile:
    """tile with enough warps for its accumulators, and fewer stages, then shorter K strips, until it fits."""
    tile = dataclasses.replace(tile, num_warps=8 if block_m * weight_tiles * tile.block_n >= 16384 else 4)
    while not fits(block_m, tile, weight_tiles) and tile.num_stages > 2:
        tile = dataclasses.replace(tile, num_stages=tile.num_stages - 1)
    while not fits(block_m, tile, weight_tiles) and tile.block_k > 32:
        tile = dataclasses.replace(tile, block_k=tile.block_k // 2)
    return tile


def tile_variants(tile: MatmulTile, block_m: int, weight_tiles: int) -> list[MatmulTile]:
    """Half and twice as wide, the other K strip, one stage more or less: few enough to compile in the budget."""
    other_k = 128 if tile.block_k <= 64 else 256 if block_m <= 32 else 64
    candidates = [
        dataclasses.replace(tile, block_n=tile.block_n // 2),
        dataclasses.replace(tile, block_n=tile.block_n * 2),
        dataclasses.replace(tile, block_k=other_k, num_stages=3 if other_k > tile.block_k else 4),
        dataclasses.replace(tile, num_stages=tile.num_stages + 1 if tile.num_stages < 4 else 3),
    ]
    variants = []
    for candidate in candidates:
        candidate = shrink_to_fit(candidate, block_m, weight_tiles)
        if candidate.block_n >= 16 and fits(block_m, candidate, weight_tiles) and candidate != tile \
                and candidate not in variants:
            variants.append(candidate)
    return variants


def with_block_m(config: TritonMoeConfig, block_m: int) -> TritonMoeConfig:
    """config's tiles at another block_m, trimmed to fit."""
    return TritonMoeConfig(block_m, shrink_to_fit(config.gate_up, block_m, 2), shrink_to_fit(config.down, block_m, 1))


def describe(config: TritonMoeConfig) -> str:
    def one(t: MatmulTile) -> str:
        return f"n{t.block_n} k{t.block_k} w{t.num_warps} s{t.num_stages}"
    return f"m{config.block_m} | gate_up {one(config.gate_up)} | down {one(config.down)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="mixtral,qwen3")
    parser.add_argument("--tokens", default="1,16,64,256")
    parser.add_argument("--budget-s", type=float, default=170.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    started = time.monotonic()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    results = []
    with torch.no_grad():
        for shape in args.shapes.split(","):
            num_experts, top_k, hidden, inter = SHAPES[shape]
            experts = StackedExperts.empty(list(range(num_experts)), num_experts, hidden, inter, torch.bfloat16,
                                           "cuda")
            experts.gate_up.normal_(std=hidden ** -0.5)
            experts.down.normal_(std=inter ** -0.5)
            for tokens in (int(t) for t in args.tokens.split(",")):
                gen = torch.Generator().manual_seed(tokens)
                x = torch.randn(tokens, hidden, generator=gen).to("cuda", torch.bfloat16)
                ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)])
                ids = ids.to("cuda", torch.int32)
                weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1).to("cuda")
                distinct = int(torch.unique(ids).numel())
                floor_us = (distinct * 3 * hidden * inter + 2 * tokens * hidden) * ELEMENT / bandwidth * 1e6
                pool = torch.cuda.graph_pool_handle()

                def measure(config: TritonMoeConfig) -> float | None:
                    if config is not chosen and time.monotonic() - started > args.budget_s:
                        return None  # out of time: choose_config's tiles only from here on
                    try:
                        graph, _ = capture(lambda: fused_moe(x, ids, weights, experts, "triton", config), pool)
                    except Exception as error:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
                        print(f"    {describe(config)}: failed ({type(error).__name__}: {str(error)[:80]})")
                        return None
                    us = time_fn(graph.replay, "cuda", reps=30) * 1e6
                    print(f"    {describe(config):<62} {us:8.1f} us {us / floor_us:5.2f}x", flush=True)
                    return us

                print(f"{shape} tokens {tokens}: floor {floor_us:.1f} us ({distinct} experts)", flush=True)
                chosen = choose_config(tokens, top_k, num_experts, hidden, inter)
                timed = {chosen: measure(chosen)}
                if timed[chosen] is not None:
                    for other in {16: (32,), 32: (64,), 64: (128,), 128: (64, 256)}[chosen.block_m]:
                        alt = with_block_m(chosen, other)
                        timed[alt] = measure(alt)
                    best_tile = {"gate_up": (chosen.gate_up, timed[chosen]), "down": (chosen.down, timed[chosen])}
                    for launch, weight_tiles in (("gate_up", 2), ("down", 1)):
                        for tile in tile_variants(getattr(chosen, launch), chosen.block_m, weight_tiles):
                            config = dataclasses.replace(chosen, **{launch: tile})
                            us = timed[config] = measure(config)
                            if us is not None and us < best_tile[launch][1]:
                                best_tile[launch] = (tile, us)
                    both = TritonMoeConfig(chosen.block_m, best_tile["gate_up"][0], best_tile["down"][0])
                    if both not in timed:
                        timed[both] = measure(both)
                ok = {c: us for c, us in timed.items() if us is not None}
                if not ok:
                    continue
                best = min(ok, key=ok.get)
                print(f"  best {describe(best)}: {ok[best]:.1f} us = {ok[best] / floor_us:.2f}x floor "
                      f"(choose_config: {ok.get(chosen, float('nan')):.1f} us)", flush=True)
                results.append({"shape": shape, "tokens": tokens, "floor_us": floor_us,
                                "chosen": describe(chosen), "chosen_us": ok.get(chosen),
                                "best": describe(best), "best_us": ok[best],
                                "all": {describe(c): us for c, us in timed.items()}})
            del experts
            torch.cuda.empty_cache()
    print(f"\n{'shape':<8} {'tokens':>6} {'floor':>8} {'chosen':>8} {'x':>5} {'best':>8} {'x':>5}  best config")
    for r in results:
        chosen_us = r["chosen_us"] or float("nan")
        floor_us, best_us = r["floor_us"], r["best_us"]
        print(f"{r['shape']:<8} {r['tokens']:>6} {floor_us:>8.1f} {chosen_us:>8.1f} {chosen_us / floor_us:>5.2f} "
              f"{best_us:>8.1f} {best_us / floor_us:>5.2f}  {r['best']}")
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"copy_bytes_per_s": bandwidth, "points": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
