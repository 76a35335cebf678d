"""`expertmesh launch --ray` over a real Ray cluster of three "hosts" on this machine (ray.cluster_utils): the head,
where the launcher and the gateway run, a host for attention nodes and one for expert nodes, told apart by custom
resources that stand for their GPU types. Greedy output equals transformers'; an expert node killed on its host is
restarted there and the cluster serves again, as on one host; a node's actor killed on a live host is replaced there,
a lost host stops the cluster; what Ray cannot hold is refused with its resource named. Ray is in the test extra;
skipped where it is not installed (pip install 'expertmesh[ray]')."""
from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

from .cluster import Cluster, alive, wait_for
from .test_cluster_http import PROMPTS, assert_greedy_tokens_and_logprobs_equal_transformers

pytest.importorskip("ray", reason="ray is not installed: pip install 'expertmesh[ray]'")
pytestmark = pytest.mark.slow

# every role's bundle asks its "host" for its stand-in GPU type
RESOURCES = {"attention": {"fastmem": 1}, "expert": {"compute": 1}}


@pytest.fixture(scope="module")
def ray_hosts():
    from ray.cluster_utils import Cluster as RayHosts
    hosts = RayHosts(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        attention_host = hosts.add_node(num_cpus=2, resources={"host_a": 1, "fastmem": 2})
        expert_host = hosts.add_node(num_cpus=2, resources={"host_b": 1, "compute": 2})
        hosts.wait_for_nodes()
        yield hosts, attention_host.node_id, expert_host.node_id
    finally:
        hosts.shutdown()


def test_greedy_output_equals_transformers_and_a_killed_node_is_restarted_on_its_host(ray_hosts, mixtral_dir,
                                                                                      tmp_path):
    hosts, attention_host, expert_host = ray_hosts
    config = tmp_path / "ray.json"
    config.write_text(json.dumps({"cluster": {"ray_resources": RESOURCES}}))
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=2,
                      extra=["--ray", hosts.address, "--config", str(config), "--recv-timeout", "5"]).wait_ready()
    try:
        placed = re.findall(r"expertmesh: (\w+ node \d+): pid (\d+) on \S+ \(Ray node (\w+)\)", cluster.text())
        assert {name: node for name, _, node in placed} == {
            "expert node 0": expert_host, "expert node 1": expert_host, "attention node 0": attention_host}
        pids = {name: int(pid) for name, pid, _ in placed}
        assert_greedy_tokens_and_logprobs_equal_transformers(cluster, mixtral_dir, PROMPTS[:4], max_tokens=16)

        os.kill(pids["expert node 1"], signal.SIGKILL)
        killed_at = time.monotonic()
        with cluster.client() as client:
            def served_again():
                try:
                    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
                except httpx.HTTPError:
                    return False
                return r.status_code == 200 and re.search(r"expert node 1 restarted \(pid \d+ on", cluster.text())

            wait_for(served_again, 90, "the cluster to serve again", interval_s=0.5)
            print(f"serving again {time.monotonic() - killed_at:.1f} s after the kill")
        assert cluster.process.poll() is None  # the launcher never exited
        assert "expert node 1 (pid %d on" % pids["expert node 1"] in cluster.text()
        assert "exited with code -9; restarting it" in cluster.text()
        pids["expert node 1"] = int(re.findall(r"expert node 1 restarted \(pid (\d+) on", cluster.text())[-1])
        assert_greedy_tokens_and_logprobs_equal_transformers(cluster, mixtral_dir, PROMPTS[4:6], max_tokens=8)
    finally:
        cluster.stop()
    assert cluster.process.returncode == 0, cluster.text()  # SIGTERM: a clean stop, every node with it
    wait_for(lambda: not any(alive(pid) for pid in pids.values()), 15, "every node to exit")


def test_what_the_ray_cluster_cannot_hold_is_refused_naming_the_resource(ray_hosts, mixtral_dir):
    from expertmesh.config import Config
    from expertmesh.launcher.ray_cluster import ClusterError, RayCluster
    hosts, _, _ = ray_hosts
    config = Config()
    config.model.path, config.cluster.attention_nodes, config.cluster.expert_nodes = str(mixtral_dir), 1, 3
    config.cluster.ray_resources = RESOURCES  # 3 expert nodes, 2 "compute" in the cluster
    cluster = RayCluster(config, hosts.address)
    try:
        with pytest.raises(ClusterError, match=r"not enough compute in the Ray cluster .*: the expert nodes need 3, "
                                               r"it has 2"):
            cluster.start()
    finally:
        cluster.stop()
    config.cluster.expert_nodes, config.cluster.expert_gpu_type = 2, "H200"
    cluster = RayCluster(config, hosts.address)
    try:
        with pytest.raises(ClusterError, match=r"offers GPU type 'H200' for the expert nodes .*'compute'"):
            cluster.start()
    finally:
        cluster.stop()


def test_an_actor_lost_on_a_live_host_is_replaced_there_and_a_lost_host_stops_the_cluster(ray_hosts):
    """A node's actor that dies on a host still alive comes back on that host and starts the node again; a node
    whose host is gone stops the cluster, naming the host, rather than come back under an address nobody knows."""
    import ray
    from expertmesh.launcher.node_host import NodeHost
    from expertmesh.launcher.ray_cluster import ACTOR_DIED, ClusterError, RayNode
    hosts, _, expert_host = ray_hosts
    ray.init(address=hosts.address)
    try:
        def new_actor():  # only the expert "host" has compute: there, as a bundle of the placement group would be
            return ray.remote(NodeHost).options(num_cpus=0, resources={"compute": 0.01}).remote("expert node 0")

        start_args = ({}, "expertmesh.launcher.node_host", 0)  # a stand-in node: a module that exits at once
        node = RayNode("expert node 0", new_actor(), "10.0.0.2", expert_host, new_actor=new_actor,
                       start_args=start_args)
        first_pid = node.pid = node.call("start", *start_args)
        ray.kill(node.actor)
        # Ray may call the killed actor unavailable (None: a blip) before it calls it dead
        deadline = time.monotonic() + 30
        while (code := node.exit_code()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert code == ACTOR_DIED and "its Ray actor died" in node.where()
        node.restart()
        assert not node.actor_died and node.pid != first_pid
        assert node.call("reserve", 0)[1] == expert_host

        lost = RayNode("expert node 1", new_actor(), "10.0.0.3", "f" * 56, new_actor=new_actor)  # no such Ray node
        assert lost.exit_code() is None  # nothing started yet: nothing died
        ray.kill(lost.actor)
        # the kill is asynchronous: a call that reaches the actor first, or a blip, still answers None
        deadline = time.monotonic() + 30
        with pytest.raises(ClusterError, match=rf"expert node 1's host 10.0.0.3 \(Ray node f+\) is lost"):
            while lost.exit_code() is None and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        ray.shutdown()
