"""A node lost under streaming load, on a real local cluster over the message M2N (ucx, the CPU default; and zmq).

An expert node whose experts all have replicas on the other: every request completes, greedy output identical to
an undisturbed run, and the restarted node rejoins by itself. Without replicas: the requests it was computing end
with a clear error, new ones wait, then get 503 with Retry-After (or succeed), and the cluster serves the same
tokens once the node is back. An attention node: its requests end with a clear error, new ones go to the other."""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from expertmesh.bench import prometheus
from expertmesh.model.spec import ModelSpec
from expertmesh.placement.plan import Placement

from .cluster import Cluster, wait_for
from .test_launcher import role_pid

pytestmark = pytest.mark.slow

PROMPTS = ["hello", "def f(x):", "la la la", "the cat", "import os", "once upon", "1, 2, 3,", "Bonjour"]
MAX_TOKENS = 32


def stream(url: str, prompt: str, progress: list[int], index: int) -> tuple[str, str | None]:
    """(text, error message or None) of a greedy streamed completion; progress[index] counts its chunks."""
    pieces = []
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as client, client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    return "".join(pieces), event["error"]["message"]
                pieces.append(event["choices"][0]["text"])
                progress[index] += 1
    return "".join(pieces), None


def streams(cluster: Cluster, kill: tuple[str, int] | None = None) -> tuple[list[tuple[str, str | None]], list[int]]:
    """Every prompt streamed at once; with kill=(module, index), that node is SIGKILLed once every stream has some
    tokens. Returns the outcomes and each stream's chunks at the kill."""
    progress = [0] * len(PROMPTS)
    at_kill: list[int] = []
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        running = [pool.submit(stream, cluster.url, prompt, progress, i) for i, prompt in enumerate(PROMPTS)]
        if kill is not None:
            victim = role_pid(cluster.process.pid, *kill)
            wait_for(lambda: min(progress) >= 4 or any(f.done() for f in running), 30, "every stream to start")
            os.kill(victim, signal.SIGKILL)
            at_kill = list(progress)
            cluster.killed_at = time.monotonic()
        return [f.result(timeout=60) for f in running], at_kill  # a hung request fails here


def metric(client: httpx.Client, name: str, **labels: str) -> float | None:
    return prometheus.value(client.get("/metrics").text, name, **labels)


def health(client: httpx.Client) -> tuple[int, list[str]]:
    response = client.get("/health")
    return response.status_code, response.json().get("not_ready", [])


@pytest.mark.parametrize("transport", ["auto", "zmq"])  # auto: ucx where ucxx imports
def test_expert_node_with_replicas_lost_under_load_costs_no_request(mixtral_dir, tmp_path, transport):
    spec = ModelSpec.from_dir(mixtral_dir)
    every_expert_on_both = [[e * 2 // spec.num_experts, 1 - e * 2 // spec.num_experts] for e in range(spec.num_experts)]
    placement = tmp_path / "replicated.json"
    placement.write_text(Placement(2, {layer: every_expert_on_both for layer in spec.moe_layer_ids}).to_json())
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=2,
                      extra=["--placement", str(placement), "--transport", transport])
    try:
        cluster.wait_ready()
        undisturbed, _ = streams(cluster)
        assert all(error is None for _, error in undisturbed), undisturbed
        disturbed, at_kill = streams(cluster, kill=("expertmesh.expert_node", 1))
        assert max(at_kill) < MAX_TOKENS  # the node died while every stream was running
        assert disturbed == undisturbed  # no error, same greedy tokens

        with cluster.client() as client:
            wait_for(lambda: metric(client, "expertmesh_node_restarts_total", node="expert_node_1") == 1, 30,
                     "the restarted expert node to answer the gateway")
            wait_for(lambda: health(client)[0] == 200, 30, "/health 200")
            bytes_to_node1 = metric(client, "expertmesh_link_bytes_sent_total", attention_node="0", expert_node="1")

            def node1_serves_again():  # rejoined: the attention node sends it tokens again
                response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
                assert response.status_code == 200, response.text
                return metric(client, "expertmesh_link_bytes_sent_total", attention_node="0",
                              expert_node="1") > bytes_to_node1
            wait_for(node1_serves_again, 30, "the attention node to send to the rejoined expert node", 0.2)
            print(f"expert node 1 serves again {time.monotonic() - cluster.killed_at:.1f} s after the kill")
        assert cluster.process.poll() is None
        assert "its experts go to their replicas" in cluster.text() and "expert node 1 rejoined" in cluster.text()
    finally:
        cluster.stop()
    assert "Traceback" not in cluster.text(), cluster.text()


def test_expert_node_without_replicas_lost_fails_its_requests_then_503_until_it_rejoins(mixtral_dir, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"gateway": {"node_wait_s": 0.5}}))  # 503 soon, rather than waiting out the restart
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=2, extra=["--config", str(config)])
    try:
        cluster.wait_ready()
        with cluster.client() as client:
            greedy = {"prompt": "hello", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
            reference = client.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
            outcomes, at_kill = streams(cluster, kill=("expertmesh.expert_node", 1))
            assert max(at_kill) < MAX_TOKENS
            for _, error in outcomes:  # each ends, with an error that names the lost node
                assert error is not None and "expert node 1" in error, outcomes

            # the gateway learns from the attention node's status that it waits for its experts
            wait_for(lambda: "attention node 0" in health(client)[1], 10, "the attention node to be not ready")
            refused = 0
            while True:  # new requests during the restart: 503 with Retry-After, or a wait that ends in success
                response = client.post("/v1/completions", json=greedy)
                if response.status_code == 200:
                    break
                assert response.status_code == 503 and response.headers["Retry-After"], response.text
                assert "attention node 0" in response.json()["error"]["message"]
                refused += 1
                assert refused < 200, "not serving again"
            assert refused > 0
            print(f"serving again {time.monotonic() - cluster.killed_at:.1f} s after the kill ({refused} requests "
                  f"got 503 meanwhile)")
            assert response.json()["choices"][0]["text"] == reference
            assert metric(client, "expertmesh_node_restarts_total", node="expert_node_1") == 1
            wait_for(lambda: health(client)[0] == 200, 30, "/health 200")
        assert cluster.process.poll() is None  # the attention node did not exit either: no restart of it
        assert "attention node 0 (pid" not in cluster.text()
    finally:
        cluster.stop()
    assert "Traceback" not in cluster.text(), cluster.text()  # a lost node is said in one line, where it matters


def test_attention_node_lost_fails_its_requests_and_the_other_serves(mixtral_dir):
    cluster = Cluster(mixtral_dir, attention_nodes=2, expert_nodes=1)
    try:
        cluster.wait_ready()
        undisturbed, _ = streams(cluster)
        outcomes, at_kill = streams(cluster, kill=("expertmesh.attention_node", 0))
        assert max(at_kill) < MAX_TOKENS
        failed = [error for _, error in outcomes if error is not None]
        assert failed and all("attention node 0" in error for error in failed), outcomes
        assert len(failed) < len(PROMPTS)  # the other node's streams went on
        assert all(out == ref for out, ref in zip(outcomes, undisturbed) if out[1] is None)
        with cluster.client() as client:
            assert "attention node 0" in health(client)[1]  # known at once, not after node_timeout_s
            for prompt in PROMPTS[:4]:  # new requests go to attention node 1 meanwhile
                response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8})
                assert response.status_code == 200, response.text
            wait_for(lambda: health(client)[0] == 200, 30, "/health 200: the restarted node rejoined")
            assert metric(client, "expertmesh_node_restarts_total", node="attention_node_0") == 1
            steps = metric(client, "expertmesh_engine_steps_total", attention_node="0")

            def node0_serves_again():  # the least loaded: it got none of the requests sent meanwhile
                response = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
                assert response.status_code == 200, response.text
                return metric(client, "expertmesh_engine_steps_total", attention_node="0") > steps
            wait_for(node0_serves_again, 30, "the restarted attention node to take requests", 0.2)
    finally:
        cluster.stop()
