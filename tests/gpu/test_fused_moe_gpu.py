"""The fused MoE op on a CUDA GPU: every backend against the reference (bf16 and fp32; Qwen3-like and
Mixtral-like routing at reduced sizes, odd sizes, the full-size layers), a CUDA graph's replay on new inputs,
no host sync inside the op, the Triton block layout bit for bit against its torch reference, and the Triton
backend's four launches."""
import pytest
import torch

from expertmesh.ops.fused_moe import StackedExperts, fused_moe, fused_moe_reference, stack_experts
from expertmesh.ops.fused_moe_triton import expert_blocks, expert_blocks_reference
from tests.fused_moe_cases import random_experts, random_routing, rel_err

pytestmark = pytest.mark.gpu

# name: (num_experts, top_k, hidden, inter, held experts); half the experts held, as on one of two nodes
SHAPES = {"qwen3-like": (128, 8, 256, 192, range(0, 128, 2)), "mixtral-like": (8, 2, 512, 1024, range(0, 8, 2))}
BACKENDS = ["grouped_mm", "triton"]
BF16_TOLERANCE = 2e-2
FP32_TOLERANCE = 1e-4


def float32_truth(x, ids, weights, raw, num_experts):
    """The reference in float32 arithmetic on the same (possibly bf16) values."""
    exact = stack_experts({e: tuple(w.float() for w in ws) for e, ws in raw.items()}, num_experts)
    return fused_moe_reference(x.float(), ids, weights, exact)


def check_backend(backend, dtype, tokens, num_experts, top_k, hidden, inter, held, skip_every=5):
    raw, stacked = random_experts(num_experts, list(held), hidden, inter, dtype, "cuda")
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2)).to(dtype=dtype, device="cuda")
    ids, weights = random_routing(tokens, num_experts, top_k, skip_every, "cuda")
    got = fused_moe(x, ids, weights, stacked, backend=backend)
    assert got.dtype == dtype and got.shape == x.shape and got.is_cuda
    if dtype == torch.float32:
        assert rel_err(got, fused_moe_reference(x, ids, weights, stacked)) <= FP32_TOLERANCE
    else:
        truth = float32_truth(x, ids, weights, raw, num_experts)
        assert rel_err(got, truth) <= BF16_TOLERANCE
        assert rel_err(fused_moe_reference(x, ids, weights, stacked), truth) <= BF16_TOLERANCE
    assert not got.isnan().any()


@pytest.mark.parametrize("tokens", [1, 16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_reference(backend, shape, dtype, tokens):
    """fp32 grouped_mm runs torch's fallback (a host sync per call, still the right numbers)."""
    check_backend(backend, dtype, tokens, *SHAPES[shape])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes(backend, dtype):
    """hidden 100 and inter 60: rows not multiples of 16 bytes (grouped_mm pads them), partial tiles in Triton."""
    check_backend(backend, dtype, 37, 16, 4, 100, 60, range(16), skip_every=3)


def full_size_layer(num_experts, hidden, inter, dtype):
    """A whole layer's experts made on the GPU (the CPU generator would take minutes at these sizes)."""
    stacked = StackedExperts.empty(list(range(num_experts)), num_experts, hidden, inter, dtype, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    stacked.gate_up.copy_(torch.randn(stacked.gate_up.shape, generator=g, device="cuda") / hidden ** 0.5)
    stacked.down.copy_(torch.randn(stacked.down.shape, generator=g, device="cuda") / inter ** 0.5)
    return stacked


@pytest.mark.parametrize("tokens", [1, 16, 256])
@pytest.mark.parametrize("num_experts, top_k, hidden, inter", [(8, 2, 4096, 14336), (128, 8, 2048, 768)],
                         ids=["mixtral-8x7b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_full_size_layers_bf16(backend, num_experts, top_k, hidden, inter, tokens):
    stacked = full_size_layer(num_experts, hidden, inter, torch.bfloat16)
    x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
    ids, weights = random_routing(tokens, num_experts, top_k, device="cuda")
    weights = weights / weights.sum(dim=-1, keepdim=True)
    exact = StackedExperts(stacked.gate_up.float(), stacked.down.float(), stacked.local_index, stacked.expert_ids)
    truth = fused_moe_reference(x.float(), ids, weights, exact)
    del exact
    got = fused_moe(x, ids, weights, stacked, backend=backend)
    assert rel_err(got, truth) <= BF16_TOLERANCE


@pytest.mark.parametrize("backend, dtype", [("triton", torch.bfloat16), ("triton", torch.float32),
                                            ("grouped_mm", torch.bfloat16), ("auto", torch.bfloat16)], ids=str)
def test_cuda_graph_replay_on_new_inputs(backend, dtype):
    num_experts, top_k, hidden, inter, held = SHAPES["qwen3-like"]
    _, stacked = random_experts(num_experts, list(held), hidden, inter, dtype, "cuda")
    tokens = 48
    static_x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    static_ids, static_weights = random_routing(tokens, num_experts, top_k, 5, "cuda", seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) off the capture stream, as torch advises
        for _ in range(2):
            fused_moe(static_x, static_ids, static_weights, stacked, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fused_moe(static_x, static_ids, static_weights, stacked, backend=backend)
    for seed in (2, 3):  # new tokens and a new routing, copied into the captured buffers
        x = torch.randn(tokens, hidden, device="cuda").to(dtype)
        ids, weights = random_routing(tokens, num_experts, top_k, 3, "cuda", seed=seed)
        static_x.copy_(x)
        static_ids.copy_(ids)
        static_weights.copy_(weights)
        graph.replay()
        expected = fused_moe(x, ids, weights, stacked, backend=backend)
        assert torch.equal(static_out, expected)  # the same kernels on the same inputs
        tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
        assert rel_err(static_out, fused_moe_reference(x, ids, weights, stacked)) <= 2 * tolerance


@pytest.mark.parametrize("backend, dtype", [("triton", torch.bfloat16), ("triton", torch.float16),
                                            ("triton", torch.float32), ("grouped_mm", torch.bfloat16),
                                            ("auto", torch.bfloat16), ("auto", torch.float16),
                                            ("auto", torch.float32)], ids=str)
def test_no_host_sync(backend, dtype):
    num_experts, top_k, hidden, inter, held = SHAPES["mixtral-like"]
    _, stacked = random_experts(num_experts, list(held), hidden, inter, dtype, "cuda")
    x = torch.randn(20, hidden, device="cuda").to(dtype)
    ids, weights = random_routing(20, num_experts, top_k, 4, "cuda")
    fused_moe(x, ids, weights, stacked, backend=backend)  # compiles outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fused_moe(x, ids, weights, stacked, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert rel_err(out, fused_moe_reference(x, ids, weights, stacked)) <= 3e-2


@pytest.mark.parametrize("tokens, num_experts, held, top_k, block_m", [
    (1, 8, range(8), 2, 16), (256, 8, range(8), 2, 128), (256, 128, range(128), 8, 32),
    (37, 160, range(0, 160, 3), 8, 16), (4096, 128, range(128), 8, 128), (4096, 8, [1, 6], 2, 64)])
def test_expert_blocks_match_reference(tokens, num_experts, held, top_k, block_m):
    """The layout kernel (histogram, prefix sum, per-expert scatter) on the GPU against the argsort reference,
    at decode sizes and at prefill sizes where its loops take several steps."""
    _, stacked = random_experts(num_experts, list(held), 16, 16, torch.bfloat16, "cuda")
    ids, _ = random_routing(tokens, num_experts, top_k, 7, "cuda")
    num_local = len(stacked.expert_ids)
    expected = expert_blocks_reference(ids, stacked.local_index, num_local, block_m)
    for routing in (ids, ids.long()):
        got = expert_blocks(routing, stacked.local_index, num_local, block_m)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_backend_is_four_launches(shape):
    """Layout, gate_up, down, sum over k: no casts, fills, sorts or scans besides."""
    num_experts, top_k, hidden, inter, held = SHAPES[shape]
    _, stacked = random_experts(num_experts, list(held), hidden, inter, torch.bfloat16, "cuda")
    x = torch.randn(16, hidden, device="cuda").to(torch.bfloat16)
    ids, weights = random_routing(16, num_experts, top_k, 5, "cuda")
    fused_moe(x, ids, weights, stacked, backend="triton")  # compiles outside the count
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fused_moe(x, ids, weights, stacked, backend="triton")
        torch.cuda.synchronize()
    launched = sorted(e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    assert launched == ["down_kernel", "expert_blocks_kernel", "gate_up_kernel", "sum_over_k_kernel"], launched


@pytest.mark.parametrize("shape", SHAPES)
def test_expert_node_warm_up_leaves_no_variant_to_load_while_serving(shape):
    """After an expert node's warm-up, rounds of any size, carved from a receive slot as the links carve them,
    compile and load no new Triton variant: a load while an NCCL receive is pending would wait for the device to
    drain, and with the attention node loading too, neither would (m2n/link_plan.needs_eager_loading)."""
    from expertmesh.cuda_graph import warm_up_sizes
    from expertmesh.expert_node.node import ExpertNode
    from expertmesh.ops.fused_moe_triton import _triton_kernels
    from expertmesh.transport.protocol import TensorMeta, packed_views
    num_experts, top_k, hidden, inter, held = SHAPES[shape]
    _, stacked = random_experts(num_experts, list(held), hidden, inter, torch.bfloat16, "cuda")
    node = ExpertNode(0, {1: stacked}, num_experts, listener=None, moe_backend="triton")
    for tokens in [1] + warm_up_sizes(512):  # what expert_node/__main__.py runs at start
        node.warm_up(tokens, top_k)
    kernels = vars(_triton_kernels()).values()
    variants = lambda: [len(k.device_caches[torch.cuda.current_device()][0]) for k in kernels]  # noqa: E731
    warmed = variants()
    slot = torch.zeros(8 << 20, dtype=torch.uint8, device="cuda")
    for tokens in [3, 7, 13, 29, 100, 255, 333, 511]:
        x, ids, weights = packed_views(slot, [TensorMeta(torch.bfloat16, (tokens, hidden)),
                                              TensorMeta(torch.int32, (tokens, top_k)),
                                              TensorMeta(torch.float32, (tokens, top_k))])
        routed_ids, routed_weights = random_routing(tokens, num_experts, top_k, 3, "cuda", seed=tokens)
        ids.copy_(routed_ids), weights.copy_(routed_weights), x.normal_()
        node.compute(1, [x], [ids], [weights])
    torch.cuda.synchronize()
    assert variants() == warmed
