"""The RMSNorm and rotary/KV-write Triton kernels and the fused router on a GPU against their torch references at
serving sizes (bf16 and fp32), replayed in a CUDA graph on new inputs, with no host sync, and their time in a graph.

Without the Qwen3 norm the rotary kernel rounds exactly where torch's separate ops round and uses no FMA, so it is
checked bitwise; a norm's sum and rsqrt may round differently from torch's, by a step of the result at most."""
import pytest
import torch

from expertmesh.cuda_graph import capture
from expertmesh.model.rotary import RotaryTable
from expertmesh.model.spec import Rope
from expertmesh.ops.norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from expertmesh.ops.rotary import rotate_and_write_kv, rotate_and_write_kv_reference
from expertmesh.ops.router import route_fused, route_reference

pytestmark = pytest.mark.gpu

# hidden, q heads, kv heads, head_dim, q/k norm, experts, top-k
SHAPES = {"mixtral": (4096, 32, 8, 128, False, 8, 2), "qwen3": (2048, 32, 4, 128, True, 128, 8),
          "head64": (1024, 16, 2, 64, True, 64, 4)}
DTYPES = [torch.bfloat16, torch.float32]
BLOCK_SIZE = 16


def randn(*shape, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda").to(dtype)


def normed_tolerance(dtype):
    """A step of a bf16 result (two, counting the weight's product); a few float32 ulps."""
    return {"atol": 1e-5, "rtol": 2 ** -6} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (64, 4096), (4096, 2048), (33, 5120), (64 * 32, 128)])
def test_rms_norm_and_add_rms_norm_match_the_reference(rows, hidden, dtype):
    x, residual = randn(rows, hidden, dtype=dtype) * 4, randn(rows, hidden, dtype=dtype, seed=1)
    weight = randn(hidden, dtype=dtype, seed=2)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6),
                               **normed_tolerance(dtype))
    normed, summed = add_rms_norm(x, residual, weight, 1e-6)
    expected_normed, expected_summed = add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(summed, expected_summed)
    torch.testing.assert_close(normed, expected_normed, **normed_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_heads_strided_in_qkv_rows(dtype):
    qkv = randn(64, 40 * 128, dtype=dtype)
    q = qkv[:, :32 * 128].view(64, 32, 128)
    weight = randn(128, dtype=dtype, seed=1)
    torch.testing.assert_close(rms_norm(q, weight, 1e-6), rms_norm_reference(q, weight, 1e-6),
                               **normed_tolerance(dtype))


def qkv_step(shape, tokens, dtype, seed=0, padding_tokens=3, max_len=4096):
    """Inputs of rotate_and_write_kv: positions anywhere in the table, each real token at its own slot of a
    NaN-filled cache (scattered), the last padding_tokens with slot -1."""
    hidden, num_heads, num_kv_heads, head_dim, qk_norm, _, _ = SHAPES[shape]
    table = RotaryTable(Rope(1e6), head_dim, max_len, dtype, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=seed)
    positions = torch.randint(0, max_len, (tokens,), generator=gen, device="cuda")
    num_blocks = tokens // BLOCK_SIZE + 2
    slot_mapping = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device="cuda")[:tokens]
    slot_mapping[tokens - padding_tokens:] = -1
    norms = ((randn(head_dim, dtype=dtype, seed=seed + 1), randn(head_dim, dtype=dtype, seed=seed + 2)) if qk_norm
             else (None, None))
    cache = torch.full((num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), float("nan"), dtype=dtype, device="cuda")
    return (qkv, positions, table.cos, table.sin), cache, slot_mapping, norms, (num_heads, num_kv_heads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [4, 64, 3000])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rotate_and_write_kv_matches_the_reference(shape, tokens, dtype):
    inputs, cache, slot_mapping, norms, heads = qkv_step(shape, tokens, dtype)
    caches = [cache.clone() for _ in range(4)]
    q = rotate_and_write_kv(*inputs, caches[0], caches[1], slot_mapping, *heads, *norms, 1e-6)
    expected = rotate_and_write_kv_reference(*inputs, caches[2], caches[3], slot_mapping, *heads, *norms, 1e-6)
    assert q.is_contiguous() and q.shape == expected.shape
    assert torch.equal(caches[1].nan_to_num(-9.0), caches[3].nan_to_num(-9.0))  # v: copied, padding skipped
    if norms[0] is None:
        assert torch.equal(q, expected)
        assert torch.equal(caches[0].nan_to_num(-9.0), caches[2].nan_to_num(-9.0))
    else:
        tolerance = {"atol": 2 ** -6, "rtol": 2 ** -6} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
        torch.testing.assert_close(q, expected, **tolerance)
        assert torch.equal(caches[0].isnan(), caches[2].isnan())
        torch.testing.assert_close(caches[0].nan_to_num(-9.0), caches[2].nan_to_num(-9.0), **tolerance)


def same_choice(ids, expected_ids, logits):
    """The same experts up to the order of tied logits: the chosen logits agree position by position."""
    return torch.equal(logits.gather(1, ids.long()), logits.gather(1, expected_ids.long()))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_route_matches_the_reference(shape, norm_topk_prob):
    hidden, *_, experts, top_k = SHAPES[shape]
    x, router = randn(256, hidden, dtype=torch.bfloat16), randn(experts, hidden, dtype=torch.bfloat16, seed=1) * 0.05
    ids, weights = route_fused(x, router, top_k, norm_topk_prob)
    expected_ids, expected_weights = route_reference(x, router, top_k, norm_topk_prob)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert same_choice(ids, expected_ids, x @ router.T)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


def attention_side_ops(static, weights, heads, top_k):
    """The new ops of a layer's attention part, minus the matmuls and paged attention (tested elsewhere)."""
    normed = rms_norm(static["x"], weights["input_norm"], 1e-6)
    q = rotate_and_write_kv(static["qkv"], static["positions"], weights["cos"], weights["sin"], static["k_cache"],
                            static["v_cache"], static["slot_mapping"], *heads, weights["q_norm"], weights["k_norm"],
                            1e-6)
    post_normed, h = add_rms_norm(static["attn_out"], static["x"], weights["post_norm"], 1e-6)
    ids, expert_weights = route_fused(post_normed, weights["router"], top_k, True)
    return normed, q, post_normed, h, ids, expert_weights


def attention_side_inputs(shape, tokens, seed):
    hidden = SHAPES[shape][0]
    (qkv, positions, _, _), cache, slot_mapping, _, _ = qkv_step(shape, tokens, torch.bfloat16, seed=seed)
    return {"x": randn(tokens, hidden, dtype=torch.bfloat16, seed=seed + 10), "qkv": qkv, "positions": positions,
            "slot_mapping": slot_mapping, "attn_out": randn(tokens, hidden, dtype=torch.bfloat16, seed=seed + 11),
            "k_cache": cache, "v_cache": cache.clone()}


def attention_side_weights(shape):
    hidden, _, _, head_dim, qk_norm, experts, _ = SHAPES[shape]
    table = RotaryTable(Rope(1e6), head_dim, 4096, torch.bfloat16, "cuda")
    return {"input_norm": randn(hidden, dtype=torch.bfloat16, seed=20), "cos": table.cos, "sin": table.sin,
            "q_norm": randn(head_dim, dtype=torch.bfloat16, seed=21) if qk_norm else None,
            "k_norm": randn(head_dim, dtype=torch.bfloat16, seed=22) if qk_norm else None,
            "post_norm": randn(hidden, dtype=torch.bfloat16, seed=23),
            "router": randn(experts, hidden, dtype=torch.bfloat16, seed=24) * 0.05}


@pytest.mark.parametrize("shape", ["mixtral", "qwen3"])
def test_the_ops_replay_in_a_cuda_graph_on_new_inputs(shape):
    """Each replay takes new activations, positions, slots and caches copied into the captured buffers, and gives
    what the ops give run eagerly on them (the same Triton kernels: bitwise)."""
    _, num_heads, num_kv_heads, _, _, _, top_k = SHAPES[shape]
    heads, weights, tokens = (num_heads, num_kv_heads), attention_side_weights(shape), 48
    static = attention_side_inputs(shape, tokens, seed=0)
    run = lambda: attention_side_ops(static, weights, heads, top_k)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    for seed in (1, 2, 3):
        fresh = attention_side_inputs(shape, tokens, seed)
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        graph.replay()
        expected = attention_side_ops(fresh, weights, heads, top_k)
        for got, want in zip(outputs[:4], expected[:4]):  # the Triton kernels
            assert torch.equal(got, want)
        # the router's matmul may take another cuBLAS kernel in the graph than eagerly
        assert same_choice(outputs[4], expected[4], expected[2] @ weights["router"].T)
        torch.testing.assert_close(outputs[5], expected[5], atol=1e-5, rtol=1e-4)
        assert torch.equal(static["k_cache"].nan_to_num(-9.0), fresh["k_cache"].nan_to_num(-9.0))
        assert torch.equal(static["v_cache"].nan_to_num(-9.0), fresh["v_cache"].nan_to_num(-9.0))


def test_no_host_sync():
    weights = attention_side_weights("qwen3")
    inputs = attention_side_inputs("qwen3", 64, seed=0)
    attention_side_ops(inputs, weights, (32, 4), 8)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention_side_ops(inputs, weights, (32, 4), 8)
        route_fused(inputs["x"], weights["router"], 8, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("shape", ["mixtral", "qwen3"])
def test_time_of_each_op_in_a_graph(shape, tokens, capsys):
    """Microseconds per call, from a graph of 20 calls (no launch gaps): printed for the record; the bound only
    catches a kernel gone badly wrong (each is a few microseconds of memory latency at these sizes)."""
    _, num_heads, num_kv_heads, _, _, _, top_k = SHAPES[shape]
    weights, inputs = attention_side_weights(shape), attention_side_inputs(shape, tokens, seed=0)
    heads = (num_heads, num_kv_heads)
    ops = {
        "rms_norm": lambda: rms_norm(inputs["x"], weights["input_norm"], 1e-6),
        "add_rms_norm": lambda: add_rms_norm(inputs["attn_out"], inputs["x"], weights["post_norm"], 1e-6),
        "rotate_and_write_kv": lambda: rotate_and_write_kv(
            inputs["qkv"], inputs["positions"], weights["cos"], weights["sin"], inputs["k_cache"], inputs["v_cache"],
            inputs["slot_mapping"], *heads, weights["q_norm"], weights["k_norm"], 1e-6),
        "rotate_and_write_kv_reference": lambda: reference_composition(inputs, weights, heads),
        "route_fused": lambda: route_fused(inputs["x"], weights["router"], top_k, True),
        "route_reference": lambda: route_reference(inputs["x"], weights["router"], top_k, True),
    }
    times = {name: graph_time_us(op) for name, op in ops.items()}
    with capsys.disabled():
        print(f"\n{shape} tokens={tokens}: " + ", ".join(f"{name} {us:.1f} us" for name, us in times.items()))
    for name in ("rms_norm", "add_rms_norm", "rotate_and_write_kv"):
        assert times[name] < 15.0, times


def reference_composition(inputs, weights, heads):
    """The unfused ops without the reference's boolean-mask cache write (which syncs): norm and rotary only."""
    from expertmesh.ops.rotary import apply_rotary_reference
    num_heads, num_kv_heads = heads
    head_dim = weights["cos"].shape[-1]
    q, k, _ = inputs["qkv"].split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k = q.view(q.shape[0], num_heads, head_dim), k.view(k.shape[0], num_kv_heads, head_dim)
    if weights["q_norm"] is not None:
        q, k = rms_norm_reference(q, weights["q_norm"], 1e-6), rms_norm_reference(k, weights["k_norm"], 1e-6)
    return (apply_rotary_reference(q, weights["cos"], weights["sin"], inputs["positions"]),
            apply_rotary_reference(k, weights["cos"], weights["sin"], inputs["positions"]))


def graph_time_us(fn, calls=20, reps=20) -> float:
    graph, _ = capture(lambda: [fn() for _ in range(calls)], None)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]
