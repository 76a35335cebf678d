"""Queue time: the attention node measures how long each request waited for its first step and sends it with the
first token; the gateway's client hands it on, and /metrics has it as a histogram."""
import asyncio
import contextlib
import time

from expertmesh.attention_node.node import AttentionNode
from expertmesh.bench import prometheus
from expertmesh.config import Config
from expertmesh.gateway.metrics import GatewayMetrics
from expertmesh.gateway.nodes import AttentionNodeClient
from expertmesh.transport.inproc import InprocTransport
from expertmesh.transport.protocol import SamplingParams
from tests.inproc_cluster import InprocCluster


async def drain(queue, timeout_s: float = 60) -> list:
    """(seconds since the epoch of the test, event) of every event of one request, to its end."""
    events = []
    while not events or events[-1][1].finish_reason is None:
        event = await asyncio.wait_for(queue.get(), timeout_s)
        events.append((time.monotonic(), event))
    return events


@contextlib.asynccontextmanager
async def node_with_gateways(model_dir, address: str, max_num_seqs: int, gateways: int = 1):
    """A colocated attention node serving on `address`, and `gateways` gateway-side clients connected to it."""
    async with InprocCluster(model_dir, num_expert_nodes=0, max_num_seqs=max_num_seqs) as cluster:
        transport = InprocTransport()
        control = await transport.listen(address)
        node = AttentionNode(0, Config(), cluster.spec, cluster.runner, cluster.scheduler, None, control)
        serving = asyncio.create_task(node.serve())
        clients = [AttentionNodeClient(0, await transport.connect(address), node_timeout_s=60) for _ in range(gateways)]
        for client in clients:
            client.start()
        try:
            yield clients
        finally:
            serving.cancel()
            for client in clients:
                await client.close()
            await control.close()


def test_a_request_that_waits_for_a_batch_slot_reports_its_wait(mixtral_dir):
    """One batch slot, three requests at once: the second waits for the first to finish, the third for both."""
    async def run():
        async with node_with_gateways(mixtral_dir, "inproc://queue-time", max_num_seqs=1) as (client,):
            sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            submitted = time.monotonic()
            queues = [await client.submit(f"r{i}", [5, 6, 7, 8], sampling) for i in range(3)]
            return submitted, [await drain(queue) for queue in queues]

    submitted, requests = asyncio.run(run())
    waits = []
    for events in requests:
        assert [event.finish_reason for _, event in events] == [None] * 3 + ["length"]
        first_received, first = events[0]
        assert first.queue_s is not None and all(event.queue_s is None for _, event in events[1:])
        assert 0.0 <= first.queue_s <= first_received - submitted  # the wait is part of what the client saw
        waits.append(first.queue_s)
    assert waits[0] < waits[1] < waits[2]
    # the third waited for the second's four steps on top of the second's wait
    assert waits[2] - waits[1] >= 0.5 * (requests[1][-1][0] - requests[1][0][0])


def test_queue_time_is_a_histogram_in_metrics():
    metrics = GatewayMetrics()
    for seconds in (0.002, 0.03, 1.5):
        metrics.queue_time.observe(seconds)
    text = metrics.render([], []).decode()
    assert prometheus.value(text, "expertmesh_request_queue_time_seconds_count") == 3
    assert abs(prometheus.value(text, "expertmesh_request_queue_time_seconds_sum") - 1.532) < 1e-9
    assert prometheus.value(text, "expertmesh_request_queue_time_seconds_bucket", le="0.04") == 2


def test_two_gateways_on_one_node_each_get_their_own_requests_outputs(mixtral_dir):
    """Outputs go to the gateway that submitted each request, also when two share the node (or one was restarted as a
    new peer) and their requests run in the same steps: each gets every token of its own, none of the other's."""
    async def run():
        async with node_with_gateways(mixtral_dir, "inproc://two-gateways", max_num_seqs=4, gateways=2) as clients:
            sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            queues = [await clients[i % 2].submit(f"g{i % 2}-r{i}", [5, 6, 7, 8 + i], sampling) for i in range(4)]
            return [[event for _, event in await drain(queue, timeout_s=10)] for queue in queues]

    for events in asyncio.run(run()):
        assert [event.finish_reason for event in events] == [None] * 3 + ["length"]
