"""launcher/ray_cluster.py before it touches Ray: what it refuses and why (ray missing, an unreachable head, ipc
across hosts, addresses given), and each role's bundle (cores, GPU, GPU type as Ray's accelerator_type or a custom
resource). These need no ray; tests/integration/test_ray_cluster.py runs a real Ray cluster."""
from __future__ import annotations

import socket
import sys

import pytest

from expertmesh.config import Config
from expertmesh.launcher import ClusterError
from expertmesh.launcher.ray_cluster import RayCluster, import_ray


def test_ray_missing_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ClusterError, match=r"--ray needs the ray package.*pip install 'expertmesh\[ray\]'"):
        import_ray()


def test_an_unreachable_head_is_said_at_once():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ClusterError, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port}: .*refused"):
        RayCluster(Config(), f"127.0.0.1:{port}").check_reachable()
    with pytest.raises(ClusterError, match="give the head's host:port"):
        RayCluster(Config(), "nowhere").check_reachable()


def test_what_cannot_cross_hosts_is_refused_before_anything_starts():
    config = Config()
    config.model.device, config.transport.backend = "cuda", "ipc"
    with pytest.raises(ClusterError, match="ipc links the GPUs of one host"):
        RayCluster(config, "auto").check_config()
    config.transport.backend = "auto"  # on GPUs: nccl across hosts, not ipc
    cluster = RayCluster(config, "auto")
    cluster.check_config()
    assert cluster.config.transport.backend == "nccl" and cluster.config.cluster.expert_gpus == [0, 0]
    config = Config()
    config.cluster.expert_addresses = ["tcp://10.0.0.2:5000"]
    with pytest.raises(ClusterError, match="cluster.expert_addresses given"):
        RayCluster(config, "auto").check_config()


def test_a_roles_gpu_type_is_rays_accelerator_type_or_a_custom_resource():
    config = Config()
    config.model.device, config.cluster.attention_gpu_type, config.cluster.expert_gpu_type = "cuda", "h200", "L40S"
    config.cluster.ray_resources = {"expert": {"rack_b": 1}}
    hosts = [{"CPU": 8, "GPU": 8, "accelerator_type:H200": 1, "node:10.0.0.1": 1}, {"CPU": 8, "GPU": 4, "L40S": 4}]
    cluster = RayCluster(config, "auto")
    assert cluster.bundle("attention", hosts) == {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H200": 0.001}
    assert cluster.bundle("expert", hosts) == {"CPU": 1.0, "GPU": 1.0, "rack_b": 1.0, "L40S": 1.0}
    with pytest.raises(ClusterError, match=r"offers GPU type 'L40S' for the expert nodes .* offer \['accelerator_type"
                                           r":H200'\]"):
        cluster.bundle("expert", hosts[:1])


def test_a_node_host_kills_its_node_for_a_restart_and_keeps_its_config():
    """What a lockstep world's restart asks of each host (supervision._restart_world): the process gone at once,
    the run directory (the config it starts from again) still there."""
    import sys
    from expertmesh.launcher.node_host import NodeHost
    host = NodeHost("expert node 0")
    try:
        host.command = [sys.executable, "-c", "import time; time.sleep(60)"]
        host.restart()
        host.kill()
        assert host.exit_code() is not None and host.run_dir.exists()
        host.restart()
        assert host.exit_code() is None
    finally:
        host.stop(grace_s=5)
