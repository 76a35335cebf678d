"""A cluster whose lockstep links are of two kinds at once (`--transport lockstep`, expert node 1 said to be on
another host): gloo from the attention node to expert node 0 on its host, ucx-lockstep to expert node 1. Its greedy
tokens and logprobs must equal transformers', as the one-backend clusters' do (test_cluster_http.py), and the
choice must show in the launcher's output, each node's log and /metrics."""
from __future__ import annotations

import json

import pytest

from expertmesh.bench import prometheus

from .cluster import Cluster
from .test_cluster_http import PROMPTS, assert_greedy_tokens_and_logprobs_equal_transformers

pytestmark = pytest.mark.slow


def test_gloo_and_ucx_links_in_one_cluster_serve_the_same_greedy_tokens(mixtral_dir, tmp_path):
    pytest.importorskip("ucxx")
    config = tmp_path / "hosts.json"  # one machine standing for two hosts
    config.write_text(json.dumps({"cluster": {"attention_hosts": ["host-a"], "expert_hosts": ["host-a", "host-b"]}}))
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=2,
                      extra=["--transport", "lockstep", "--microbatches", "2", "--config", str(config)]).wait_ready()
    try:
        assert_greedy_tokens_and_logprobs_equal_transformers(cluster, mixtral_dir, PROMPTS[:4], max_tokens=16)
        with cluster.client() as client:
            metrics = client.get("/metrics").text
        for expert_node, backend in enumerate(["gloo", "ucx-lockstep"]):
            assert prometheus.value(metrics, "expertmesh_link_backend", attention_node="0",
                                    expert_node=str(expert_node), backend=backend) == 1, metrics
        text = cluster.text()
        assert "lockstep links (gloo: 1 link, ucx-lockstep: 1 link)" in text
        assert "link to expert node 1 (host host-b, cpu): ucx-lockstep" in text
        assert "link to attention node 0 (host host-a, cpu): gloo" in text
    finally:
        cluster.stop()
    assert "Traceback" not in cluster.text(), cluster.text()
