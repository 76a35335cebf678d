"""The launcher owns its children: SIGTERM leaves none behind; a dead expert node stops the cluster
with a non-zero exit that names it; a dead node never hangs a request."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from expertmesh.bench import prometheus

from .cluster import Cluster, alive, child_pids, wait_for

pytestmark = pytest.mark.slow


def role_pid(launcher_pid: int, module: str, index: int) -> int:
    for pid in child_pids(launcher_pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if module.encode() in cmdline and cmdline[cmdline.index(b"--index") + 1] == str(index).encode():
            return pid
    raise LookupError(f"no {module} {index} under {launcher_pid}")


def test_sigterm_stops_every_child(mixtral_dir):
    cluster = Cluster(mixtral_dir, attention_nodes=2, expert_nodes=2).wait_ready()
    children = child_pids(cluster.process.pid)
    assert len(children) == 2 + 2 + 1
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(timeout=30) == 0
    wait_for(lambda: not any(alive(pid) for pid in children), 10, "children to exit")
    cluster.reader.join(timeout=10)  # the log is complete once every child has closed its end of the pipe
    assert "Traceback" not in cluster.text(), cluster.text()  # a clean stop, not a cancelled task's dump


def test_killed_expert_node_stops_cluster_and_fails_requests(mixtral_dir):
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=3).wait_ready()
    try:
        children = child_pids(cluster.process.pid)
        victim = role_pid(cluster.process.pid, "expertmesh.expert_node", 1)
        with cluster.client() as client, ThreadPoolExecutor(1) as pool:
            # a long request in flight when the node dies must end (error or cut short), not hang
            pending = pool.submit(client.post, "/v1/completions",
                                  json={"prompt": "hello", "max_tokens": 400, "ignore_eos": True})
            wait_for(lambda: prometheus.value(client.get("/metrics").text, "expertmesh_running_sequences",
                                              attention_node="0") == 1,
                     30, "the request to run")
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            code = cluster.process.wait(timeout=10)
            assert time.monotonic() - killed_at < 10
            try:
                response = pending.result(timeout=30)
                assert response.status_code != 200 or response.json()["usage"]["completion_tokens"] < 400
            except httpx.HTTPError:
                pass  # the gateway went down with the cluster: the client is told, nothing hangs
        assert code != 0
        assert "expert node 1" in cluster.text() and "exited with code -9" in cluster.text()
        wait_for(lambda: not any(alive(pid) for pid in children), 10, "children to exit")
    finally:
        cluster.stop()


def test_local_cluster_as_a_context_manager_serves_then_leaves_nothing(mixtral_dir):
    from expertmesh.config import Config
    from expertmesh.launcher.local import LocalCluster, free_port
    config = Config()
    config.model.path, config.cluster.attention_nodes, config.cluster.expert_nodes = str(mixtral_dir), 1, 1
    config.gateway.port = free_port()
    with LocalCluster(config) as cluster:
        assert httpx.get(f"{cluster.url}/health", timeout=5).status_code == 200
        pids = [child.process.pid for child in cluster.children]
    assert all(child.process.poll() is not None for child in cluster.children)
    assert not any(alive(pid) for pid in pids)
