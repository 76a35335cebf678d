"""The cluster's secret: a stranger who reaches a node's port, without it or with a wrong one, gets nothing
answered and injects nothing (no handshake, no dispatch computed, no request run), while the cluster keeps serving;
the config file that holds the secret is readable by its owner only."""
from __future__ import annotations

import asyncio
import stat

import httpx
import pytest
import torch

pytestmark = pytest.mark.slow


async def _answer(address: str, messages, timeout_s: float = 1.5):
    """What the peer at `address` sends back to a connection that sends `messages`, or None."""
    from expertmesh.transport.base import TransportError
    from expertmesh.transport.zmq import ZmqTransport
    conn = await ZmqTransport().connect(address)
    try:
        for message in messages:
            await conn.send(message)
        try:
            return await conn.recv(timeout_s)
        except TransportError:
            return None
    finally:
        await conn.close()


def test_strangers_are_ignored_and_the_cluster_keeps_serving(mixtral_dir):
    from expertmesh.config import Config
    from expertmesh.launcher.local import LocalCluster, free_port
    from expertmesh.model.spec import ModelSpec
    from expertmesh.transport.protocol import (AddRequest, Credentials, Dispatch, Hello, SamplingParams,
                                               StatusRequest)
    spec = ModelSpec.from_dir(mixtral_dir)
    config = Config()
    config.model.path, config.cluster.attention_nodes, config.cluster.expert_nodes = str(mixtral_dir), 1, 1
    config.transport.backend, config.gateway.port = "zmq", free_port()
    with LocalCluster(config) as cluster:
        c = cluster.config.cluster
        assert c.secret and len(c.secret) == 32
        assert stat.S_IMODE((cluster.run_dir / "cluster.json").stat().st_mode) == 0o600
        hello = Hello(0, spec.num_layers, spec.num_experts)
        dispatch = Dispatch(1, spec.moe_layer_ids[0], 0, torch.zeros(2, spec.hidden_size),
                            torch.zeros(2, spec.top_k, dtype=torch.int32), torch.ones(2, spec.top_k))
        for credentials in ([], [Credentials("not the secret")]):
            assert asyncio.run(_answer(c.expert_addresses[0], [*credentials, hello, dispatch])) is None
            assert asyncio.run(_answer(c.expert_control_addresses[0], [*credentials, StatusRequest()])) is None
            add = AddRequest("injected", [1, 2, 3], SamplingParams(max_tokens=4).to_list())
            assert asyncio.run(_answer(c.attention_addresses[0], [*credentials, add, StatusRequest()])) is None
        # with the secret, the same handshake is answered (the stranger would then be a member)
        reply = asyncio.run(_answer(c.expert_control_addresses[0], [Credentials(c.secret), StatusRequest()]))
        assert reply is not None and reply.ready
        response = httpx.post(f"{cluster.url}/v1/completions", json={"prompt": "hello", "max_tokens": 4},
                              timeout=60)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
