"""Admission control: past --max-pending-requests the API answers 429 with Retry-After at once (never queues
without bound or hangs), the requests admitted complete, and once they have, new ones are served again."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from expertmesh.bench import prometheus

from .cluster import Cluster, wait_for

pytestmark = pytest.mark.slow


def test_past_the_admission_bound_requests_get_429_then_service_resumes(mixtral_dir):
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=1, extra=["--max-pending-requests", "2"])
    cluster.wait_ready()
    try:
        with cluster.client() as client, ThreadPoolExecutor(8) as pool:
            body = {"prompt": "hello", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
            responses = list(pool.map(lambda _: client.post("/v1/completions", json=body), range(8)))
            codes = sorted(r.status_code for r in responses)
            assert set(codes) <= {200, 429} and codes.count(200) >= 2 and codes.count(429) >= 1, codes
            for r in responses:
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1"
                    assert "at capacity" in r.json()["error"]["message"]
                else:
                    assert r.json()["usage"]["completion_tokens"] == 120
            after = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
            assert after.status_code == 200
            metrics = client.get("/metrics").text
        assert prometheus.value(metrics, "expertmesh_requests_total", outcome="rejected") == codes.count(429)
    finally:
        cluster.stop()


def test_a_request_past_its_deadline_gets_504_and_its_sequence_is_freed(mixtral_dir):
    """The server's --request-timeout bounds every request; a request's own `timeout` shortens it. Past it a
    non-streamed request gets 504, a stream an error event of type timeout, and the node drops the sequence."""
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=1, extra=["--request-timeout", "60"])
    cluster.wait_ready()
    try:
        with cluster.client() as client:
            long = {"prompt": "hello", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "timeout": 0.3}
            response = client.post("/v1/completions", json=long)
            assert response.status_code == 504, response.text
            assert response.json()["error"]["type"] == "timeout" and "0.3 s" in response.json()["error"]["message"]
            with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as stream:
                events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and '"type": "timeout"' in events[-2]
            assert client.post("/v1/completions", json={**long, "timeout": 0}).status_code == 400
            ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "timeout": 30})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
            wait_for(lambda: prometheus.value(client.get("/metrics").text, "expertmesh_running_sequences",
                                              attention_node="0") == 0, 10, "the timed-out sequences dropped")
            metrics = client.get("/metrics").text
        assert prometheus.value(metrics, "expertmesh_requests_total", outcome="timed_out") == 2
    finally:
        cluster.stop()
