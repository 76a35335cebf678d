"""The gateway's choice of attention node: predicted domain within the load bound, else least loaded."""
import asyncio

import numpy as np

from expertmesh.gateway.router import RoutingPolicy, choose_node


class FakeNode:
    def __init__(self, index, load=0, ready=True):
        self.index, self.load_tokens, self.ready, self.requests_routed = index, load, ready, 0


class PlantedPredictor:
    """Token ids below 100 mean domain 0, others domain 1."""
    def predict(self, token_ids):
        votes = np.bincount([0 if t < 100 else 1 for t in token_ids], minlength=2)
        return int(votes.argmax()), votes


def test_least_loaded_without_predictor_and_none_when_nothing_ready():
    nodes = [FakeNode(0, 50), FakeNode(1, 10), FakeNode(2, 0, ready=False)]
    policy = RoutingPolicy()
    assert choose_node(nodes, [1, 2], policy).index == 1
    assert policy.decisions["least_loaded"] == 1
    assert choose_node([FakeNode(0, ready=False)], [1]) is None


def test_rebatching_to_the_predicted_domain_within_the_load_bound():
    nodes = [FakeNode(0, 100), FakeNode(1, 100), FakeNode(2, 100), FakeNode(3, 100)]
    policy = RoutingPolicy(PlantedPredictor(), attention_domain=[0, 0, 1, 1], load_bound=1.25)
    assert choose_node(nodes, [5, 6, 7], policy).index in (0, 1)
    assert choose_node(nodes, [500, 600], policy).index in (2, 3)
    # domain 1 is over the bound (mean 175, bound 218.75): the next likeliest domain takes the request
    nodes[2].load_tokens = nodes[3].load_tokens = 250
    assert choose_node(nodes, [500, 600], policy).index in (0, 1)
    assert policy.decisions == {"predicted": 2, "next_domain": 1}


def test_domain_cap_sends_to_the_next_likeliest_domain():
    # domain 1 already holds 300 of 400 queued tokens, over its expert share of 50%: the next domain takes it
    nodes = [FakeNode(0, 50), FakeNode(1, 50), FakeNode(2, 150), FakeNode(3, 150)]
    policy = RoutingPolicy(PlantedPredictor(), attention_domain=[0, 0, 1, 1], load_bound=2.0,
                           domain_share=[0.5, 0.5])
    assert choose_node(nodes, [500, 600], policy).index in (0, 1)
    assert policy.decisions == {"next_domain": 1}


class AnsweringConnection:
    """A node's control link that answers each request at once with one token that ends it."""

    def __init__(self):
        self.node, self.requests = None, []

    async def send(self, message):
        from expertmesh.transport.protocol import AddRequest, StepOutputs
        if isinstance(message, AddRequest):
            self.requests.append(message.request_id)
            asyncio.get_running_loop().call_soon(
                self.node.on_message, StepOutputs([message.request_id], [7], ["length"]))

    def on_peer_lost(self, callback):
        pass

    async def close(self):
        pass


def test_a_burst_of_streams_is_spread_over_the_nodes_before_any_of_them_submits():
    """A streaming response submits its request when its body is first read, after the handler returns: a burst
    routed meanwhile saw no load on either node and every request went to node 0. Routed requests count in their
    node's load at once (AttentionNodeClient.claim), so 16 streams at once split 8 : 8."""
    import httpx
    from expertmesh.gateway.app import ServedModel, create_app
    from expertmesh.gateway.nodes import AttentionNodeClient
    from expertmesh.gateway.text import TextCodec
    from expertmesh.model.spec import ModelSpec
    from expertmesh.transport.protocol import Status
    from tests.unit.test_gateway_auth import MODEL

    async def run():
        links = [AnsweringConnection(), AnsweringConnection()]
        nodes = [AttentionNodeClient(i, link, node_timeout_s=60.0) for i, link in enumerate(links)]
        for node, link in zip(nodes, links):
            link.node = node
            node.on_status(Status(node.index, True, 0, 0, 0, 0, 0, 0, [], [], [], None, process=1))
        app = create_app(ServedModel("mini", ModelSpec.from_dir(MODEL).vocab_size, 256, TextCodec(MODEL), nodes=nodes))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            body = {"prompt": "hello there", "max_tokens": 1, "stream": True}
            answers = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(16)))
        assert all(a.status_code == 200 and "[DONE]" in a.text for a in answers)
        return [len(link.requests) for link in links], [node.load_tokens for node in nodes]

    split, loads = asyncio.run(run())
    assert split == [8, 8] and loads == [0, 0]  # and nothing left counted once they ended
