"""The expert node over the inproc transport: it names what it holds, answers dispatches that arrived together
with one fused call per layer (each sender gets its own rows), and answers a layer it does not hold with an
ExpertError while it keeps serving."""
import asyncio

import torch

from expertmesh.expert_node.node import ExpertNode
from expertmesh.ops.fused_moe import fused_moe_reference
from expertmesh.transport.inproc import InprocTransport
from expertmesh.transport.protocol import Combine, Dispatch, ExpertError, Hello, HelloReply
from tests.fused_moe_cases import random_experts, random_routing


def test_node_holds_computes_and_reports_errors():
    num_experts, hidden = 8, 32
    _, layer1 = random_experts(num_experts, [1, 3, 6], hidden, 48, torch.float32)
    _, layer3 = random_experts(num_experts, [0], hidden, 48, torch.float32, seed=5)

    async def run():
        transport = InprocTransport()
        listener = await transport.listen("inproc://expert-node-test")
        expert_node = ExpertNode(2, {1: layer1, 3: layer3}, num_experts, listener)
        compute = expert_node._experts
        expert_node._experts = lambda *args: calls.append(args[1].shape[0]) or compute(*args)
        node = asyncio.create_task(expert_node.serve())
        try:
            conn = await transport.connect("inproc://expert-node-test")
            await conn.send(Hello(0, 4, num_experts))
            hello = await conn.recv(5.0)
            dispatches = []
            for microbatch, tokens in enumerate((5, 3)):
                ids, weights = random_routing(tokens, num_experts, 2, skip_every=3, seed=microbatch)
                hidden_states = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(microbatch))
                dispatches.append(Dispatch(7, 1, microbatch, hidden_states, ids, weights))
            for dispatch in dispatches:  # sent back to back: computed in one call
                await conn.send(dispatch)
            answers = [await conn.recv(5.0) for _ in dispatches]
            await conn.send(Dispatch(7, 2, 0, *dispatches[0].tensors()))  # layer 2: nothing held here
            error = await conn.recv(5.0)
            await conn.send(dispatches[0])  # still serving
            again = await conn.recv(5.0)
            return hello, dispatches, answers, error, again
        finally:
            node.cancel()
            await listener.close()

    calls = []
    hello, dispatches, answers, error, again = asyncio.run(run())
    assert calls == [5 + 3, 5, 5]  # the two dispatches that arrived together: one call for their 8 tokens
    assert isinstance(hello, HelloReply) and sorted(hello.held) == [1 * 8 + 1, 1 * 8 + 3, 1 * 8 + 6, 3 * 8 + 0]
    for dispatch, answer in zip(dispatches, answers):
        assert isinstance(answer, Combine) and (answer.layer, answer.microbatch) == (1, dispatch.microbatch)
        expected = fused_moe_reference(dispatch.hidden, dispatch.expert_ids, dispatch.expert_weights, layer1)
        assert torch.allclose(answer.partial, expected, rtol=1e-5, atol=1e-6)
    assert isinstance(error, ExpertError) and error.layer == 2 and "holds none" in error.error
    assert isinstance(again, Combine) and torch.allclose(again.partial, answers[0].partial, rtol=1e-5, atol=1e-6)


def test_warm_up_runs_every_held_layer_at_the_size(monkeypatch):
    """The eager call that compiles a size's kernels before a whole-step capture records them."""
    import expertmesh.expert_node.node as node_module
    num_experts, hidden = 8, 32
    _, layer1 = random_experts(num_experts, [1, 3, 6], hidden, 48, torch.float32)
    node = ExpertNode(0, {1: layer1}, num_experts, listener=None, moe_backend="reference")
    calls, real = [], node_module.fused_moe
    monkeypatch.setattr(node_module, "fused_moe", lambda h, ids, w, stacked, backend: calls.append(
        (tuple(h.shape), ids.tolist())) or real(h, ids, w, stacked, backend))
    node.warm_up(3, 2)
    assert calls == [((3, hidden), [[1, 3], [6, 1], [3, 6]])]  # every row routed to experts held here
