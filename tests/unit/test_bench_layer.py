"""`bench layer` on CPU at small shapes of each attention kind: every part runs and reports its floor."""
from expertmesh.cli import main


def test_bench_layer_times_gqa_and_mla_layers_with_shared_experts(tmp_path):
    import json
    out = tmp_path / "rows.json"
    assert main(["bench", "layer", "--device", "cpu", "--shapes", "tiny,tiny_mla", "--tokens", "2", "--contexts", "32",
                 "--dtype", "float32", "--moe-backends", "reference", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["part"]) for r in rows] == [("tiny", "attention"), ("tiny", "experts"),
                                                       ("tiny-MLA", "attention"), ("tiny-MLA", "shared"),
                                                       ("tiny-MLA", "experts")]
    assert all(r["us"] > 0 and r["floor_us"] > 0 and r["bytes"] > 0 and r["flops"] > 0 for r in rows)


def test_bench_layer_times_prefill_chunks_and_the_planner_fits_them(tmp_path):
    """Prefill rows: chunks of 16-token prompts (24 tokens: 16 + 8), causal attention flops counted per prompt."""
    import json

    from expertmesh.model.shapes import shape
    from expertmesh.planner.calibration import fit_prefill
    out = tmp_path / "rows.json"
    assert main(["bench", "layer", "--device", "cpu", "--shapes", "tiny", "--tokens", "2", "--contexts", "32",
                 "--dtype", "float32", "--moe-backends", "reference", "--reps", "1", "--prefill-tokens", "24,40",
                 "--prompt-len", "16", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    prefill = {(r["part"], r["tokens"]): r for r in rows if r["part"].startswith("prefill")}
    assert sorted(prefill) == [("prefill_attention", 24), ("prefill_attention", 40), ("prefill_experts", 24),
                               ("prefill_experts", 40)]
    assert all(r["us"] > 0 and r["floor_us"] > 0 for r in prefill.values())
    spec = shape("tiny")[1]
    per_pair = 4 * spec.num_heads * spec.head_dim  # q.k and p.v of one (token, earlier token) pair
    pairs = {24: 16 * 17 // 2 + 8 * 9 // 2, 40: 2 * 16 * 17 // 2 + 8 * 9 // 2}
    # what is left after the causal attention is 2 x tokens x the layer's matrix parameters, at both sizes
    params = {t: (prefill[("prefill_attention", t)]["flops"] - per_pair * pairs[t]) / (2 * t) for t in (24, 40)}
    assert params[24] == params[40] > 0
    attention, experts = fit_prefill(json.loads(out.read_text()), "reference")
    assert attention is not None and experts is not None


def test_experts_are_timed_over_copies_past_the_cache_as_served_layers_are(monkeypatch):
    """A served step's layers each have weights of their own, so a small layer's experts are not hot in the cache
    when it runs: on CPU too, bench layer cycles over copies of them (one copy timed the mini model's experts a
    quarter under what they take served) and over one for a layer larger than the cache."""
    import torch

    from pathlib import Path

    from expertmesh.bench import layer
    from expertmesh.model.spec import ModelSpec
    used = []
    monkeypatch.setattr(layer, "fused_moe", lambda x, ids, weights, stacked, backend: used.append(id(stacked)))
    mini = ModelSpec.from_dir(Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini")  # 1.2 MB a layer
    layer.bench_experts(mini, "mini", 2, "cpu", torch.float32, 1e10, 1e11, ("reference",), reps=8)
    assert len(set(used)) > 1
    assert layer._copies(64 * 2**20, "cpu") == 1


def test_experts_rows_record_the_flops_the_triton_kernel_computes(monkeypatch):
    """The Triton fused MoE computes every block of an expert's rows whole, padding included: bench layer records
    those flops beside the routed ones (the planner's experts line is fitted over them), and the routed flops for
    a backend without blocks."""
    import torch

    from expertmesh.bench import layer
    from expertmesh.model.shapes import shape
    from expertmesh.ops.fused_moe_triton import block_rows
    seen = []
    monkeypatch.setattr(layer, "fused_moe", lambda x, ids, weights, stacked, backend: seen.append(ids))
    name, spec = shape("tiny")
    rows = layer.bench_experts(spec, name, 40, "cpu", torch.float32, 1e10, 1e11, ("triton", "reference"), reps=2)
    block = block_rows(40, spec.top_k, spec.num_experts)
    counts = torch.bincount(seen[0].flatten().long(), minlength=spec.num_experts)
    padded = int(((counts + block - 1) // block * block).sum())
    per_row = 2 * 3 * spec.hidden_size * spec.expert_intermediate_size
    triton, reference = rows
    assert triton.kernel_flops == padded * per_row > triton.flops == 40 * spec.top_k * per_row
    assert reference.kernel_flops == reference.flops
