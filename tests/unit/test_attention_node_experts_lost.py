"""The attention node (attention_node/node.py) while some experts have no live expert node: it says it is not ready,
holds its requests until the node rejoins, and fails them with the reason after transport.rejoin_wait_s."""
import asyncio

from expertmesh.attention_node.node import AttentionNode
from expertmesh.config import Config
from expertmesh.gateway.nodes import AttentionNodeClient
from expertmesh.transport.inproc import InprocTransport
from expertmesh.transport.protocol import SamplingParams
from tests.inproc_cluster import InprocCluster


async def drain(queue) -> list:
    events = []
    while not events or events[-1].finish_reason is None:
        events.append(await asyncio.wait_for(queue.get(), 60))
    return events


def test_requests_wait_for_a_lost_expert_node_then_fail_with_the_reason(mixtral_dir):
    async def run():
        async with InprocCluster(mixtral_dir, num_expert_nodes=2) as cluster:
            config = Config()
            config.transport.rejoin_wait_s = 0.5
            control = await InprocTransport().listen("inproc://experts-lost")
            node = AttentionNode(0, config, cluster.spec, cluster.runner, cluster.scheduler, cluster.m2n, control)
            serving = asyncio.create_task(node.serve())
            client = AttentionNodeClient(0, await InprocTransport().connect("inproc://experts-lost"), 60.0)
            client.start()
            m2n = cluster.m2n
            sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            try:
                reference = await drain(await client.submit("before", [5, 6, 7], sampling))
                assert node.ready
                m2n._lose(1, m2n.connections[1], "expert node 1 was killed")  # no `connect`: it stays lost
                assert not node.ready and not node.status().ready  # the gateway sends its requests elsewhere

                # back within the bound: the request waited, then ran as if nothing happened
                waiting = asyncio.ensure_future(drain(await client.submit("waits", [5, 6, 7], sampling)))
                await asyncio.sleep(0.1)
                assert not waiting.done()
                m2n.live[1] = True
                m2n._route()
                assert [e.token_id for e in await waiting] == [e.token_id for e in reference]

                # not back within the bound: the request fails, naming what is missing
                m2n._lose(1, m2n.connections[1], "expert node 1 was killed again")
                failed = await drain(await client.submit("fails", [5, 6, 7], sampling))
                assert failed[-1].finish_reason == "error"
                assert "expert nodes [1] are lost" in failed[-1].error and "gave up after 0.5 s" in failed[-1].error
                assert serving.done() is False  # the node itself goes on
            finally:
                serving.cancel()
                await client.close()
                await control.close()

    asyncio.run(run())
