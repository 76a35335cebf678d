import msgpack
import pytest
import torch

from expertmesh.transport.protocol import (AddRequest, Combine, Dispatch, NodeTrace, ProtocolError, SamplingParams,
                                           Status, StepOutputs, decode_frames, encode_frames, tensor_to_buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64])
def test_tensors_round_trip_bit_exact(dtype):
    hidden = (torch.randn(5, 7) * 100).to(dtype)
    msg = Dispatch(3, 2, 1, hidden, torch.arange(10, dtype=torch.int32).view(5, 2), torch.rand(5, 2))
    back = decode_frames([bytes(f) for f in encode_frames(msg)])
    assert isinstance(back, Dispatch) and (back.step, back.layer, back.microbatch) == (3, 2, 1)
    assert back.hidden.dtype == dtype and torch.equal(back.hidden, hidden)
    assert torch.equal(back.expert_ids, msg.expert_ids) and torch.equal(back.expert_weights, msg.expert_weights)


def test_empty_tensor_and_scalar_only_messages():
    msg = Combine(1, 0, 0, torch.empty(0, 16))
    back = decode_frames(encode_frames(msg))
    assert back.partial.shape == (0, 16)
    status = Status(0, True, 1, 2, 3, 4, 5, 6, [1, 2], [3, 4], [5, 6], None)
    assert decode_frames(encode_frames(status)) == status
    sp = SamplingParams(8, 0.5, 0.9, 7, True, 2)
    add = decode_frames(encode_frames(AddRequest("r1", [1, 2, 3], sp.to_list())))
    assert SamplingParams.from_list(add.sampling) == sp
    out = StepOutputs(["a"], [5], [None], [None], [[-0.5, [[5, -0.5]]]])
    assert decode_frames(encode_frames(out)) == out
    trace = NodeTrace("attention node 0", [["attention", 1.5, 2.0, 0]], [["segment 0", 1.0, 0.5, 1]])
    assert decode_frames(encode_frames(trace)) == trace
    assert decode_frames(encode_frames(NodeTrace("expert node 0", []))).gpu_events == []  # no GPU spans


def test_send_side_does_not_copy():
    tensor = torch.randn(64, 32)
    view = tensor_to_buffer(tensor)
    tensor[0, 0] = 42.0
    assert torch.frombuffer(view, dtype=torch.float32)[0].item() == 42.0


def test_malformed_messages_are_named_errors():
    with pytest.raises(ProtocolError, match="malformed"):
        decode_frames([b"\xc1garbage"])
    with pytest.raises(ProtocolError, match="malformed"):
        decode_frames([msgpack.packb([999, [], []])])
    frames = encode_frames(Combine(1, 0, 0, torch.zeros(2, 4)))
    with pytest.raises(ProtocolError, match="bytes"):
        decode_frames([frames[0], b"short"])
    with pytest.raises(ProtocolError, match="tensors"):
        decode_frames(frames[:1])
    with pytest.raises(ProtocolError, match="contiguous"):
        encode_frames(Combine(1, 0, 0, torch.zeros(4, 2).T))


def test_kv_cache_and_preemptions_reach_the_metrics():
    from types import SimpleNamespace
    from expertmesh.gateway.metrics import GatewayMetrics
    status = Status(0, True, 1, 2, 3, 4, 5, 6, [], [], [], None, kv_blocks_used=30, kv_blocks_total=120,
                    preemptions=7)
    back = decode_frames(encode_frames(status))
    assert (back.kv_blocks_used, back.kv_blocks_total, back.preemptions) == (30, 120, 7)
    node = SimpleNamespace(index=0, status=back, ready=True, name="attention node 0", restarts=0)
    from expertmesh.bench import prometheus
    text = GatewayMetrics().render([node], []).decode()
    assert prometheus.value(text, "expertmesh_kv_cache_usage", attention_node="0") == 0.25
    assert prometheus.value(text, "expertmesh_kv_cache_blocks", attention_node="0") == 120
    assert prometheus.value(text, "expertmesh_preemptions_total", attention_node="0") == 7


def test_gpu_busy_reaches_the_metrics_and_the_bench_report():
    from types import SimpleNamespace
    from expertmesh.bench import prometheus
    from expertmesh.gateway.metrics import GatewayMetrics
    status = decode_frames(encode_frames(Status(0, True, 0, 0, 0, 0, 0, 0, [], [], [], None, gpu_busy_seconds=1.5,
                                                gpu_spans=300)))
    node = SimpleNamespace(index=0, status=status, ready=True, name="attention node 0", restarts=0)
    before = prometheus.parse(GatewayMetrics().render([node], []).decode())
    status.gpu_busy_seconds, status.gpu_spans = 3.5, 700
    after = prometheus.parse(GatewayMetrics().render([node], []).decode())
    busy, span_ms = prometheus.gpu_busy(prometheus.delta(after, before), duration_s=4.0)
    assert busy == {"attention_node_0": 0.5} and span_ms == {"attention_node_0": 5.0}  # 2 s of 4, 2 s / 400 spans


def test_the_gateway_fails_what_a_restarted_node_lost_and_serves_it_again():
    import asyncio
    from expertmesh.gateway.nodes import AttentionNodeClient

    async def run():
        node = AttentionNodeClient(0, connection=None, node_timeout_s=10.0)
        node.on_status(Status(0, True, 0, 0, 0, 0, 0, 0, [], [], [], None, process=100))
        queue = asyncio.Queue()
        node.streams["r1"] = queue
        node.on_status(Status(0, False, 0, 0, 0, 0, 0, 0, [], [], [], "link lost", process=100))
        assert node.dead and (await queue.get()).finish_reason == "error"  # failed at once, not left waiting
        node.streams["r2"] = queue2 = asyncio.Queue()  # sent while the node restarts: the old process took it
        node.on_status(Status(0, True, 0, 0, 0, 0, 0, 0, [], [], [], None, process=101))
        event = await queue2.get()
        assert event.finish_reason == "error" and "restarted" in event.error
        assert node.dead is None and node.restarts == 1 and node.ready

    asyncio.run(run())
