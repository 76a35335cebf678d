"""`bench layer` on CUDA: a layer smaller than the L2 is timed over several copies, each a CUDA graph of its own."""
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_experts_of_a_small_layer_are_graphed_over_copies():
    from expertmesh.bench import layer
    from expertmesh.model.shapes import shape
    name, spec = shape("tiny")
    elt = 2
    copies = layer._copies(3 * spec.num_experts * spec.hidden_size * spec.expert_intermediate_size * elt, "cuda")
    assert copies > 1
    rows = layer.bench_experts(spec, name, 16, "cuda:0", torch.bfloat16, 4e12, 1e15, ("triton",), reps=5)
    assert len(rows) == 1 and rows[0].part == "experts" and 0 < rows[0].us < 10_000
