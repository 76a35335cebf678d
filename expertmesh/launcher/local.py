"""Starts a whole cluster on this host as processes: expert nodes, attention nodes, then the gateway.

Waits until /health says every node is ready; stops every child on SIGTERM/SIGINT. Once serving, a child that
dies is restarted (same role, index, ports) by the policy of launcher/supervision.py, which stops the cluster
with a non-zero exit that names the child when it cannot mend it."""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..m2n.link_plan import data_path, settle_backend, uses_dist
from ..planner.gpus import check_cluster_gpus
from ..transport.base import resolve_backend
from . import ClusterError, supervision  # noqa: F401 (local.ClusterError, as callers import it)
from .node_host import die_with_parent, free_port, reap


MPS_PIPE = "/tmp/nvidia-mps"  # where a CUDA MPS daemon started with default settings listens


@dataclass
class Child:
    name: str  # e.g. "expert node 1"
    process: subprocess.Popen
    command: list[str]
    deaths: list[float] = dataclasses.field(default_factory=list)  # monotonic times, the recent ones
    restart_at: float | None = None  # when a restart is due
    env: dict[str, str] | None = None  # its environment, where it differs from the launcher's

    def exit_code(self) -> int | None:
        return self.process.poll()

    def where(self) -> str:
        return f"pid {self.process.pid}"

    def restart(self) -> None:
        shared = (self.env or {}).get("PROMETHEUS_MULTIPROC_DIR")
        if shared:  # a dead gateway's in-flight requests no longer count (its counters still do)
            from prometheus_client.multiprocess import mark_process_dead
            mark_process_dead(self.process.pid, shared)
        self.process = subprocess.Popen(self.command, preexec_fn=die_with_parent, env=self.env)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class LocalCluster:
    def __init__(self, config: Config, run_dir: str | Path | None = None) -> None:
        self.config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster),
                                          transport=dataclasses.replace(config.transport))
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="expertmesh-"))
        self.children: list[Child] = []

    @property
    def url(self) -> str:
        return f"http://{self.config.gateway.host}:{self.config.gateway.port}"

    def start(self) -> None:
        cluster = self.config.cluster
        check_cluster_gpus(self.config)  # a role on the wrong GPU type fails here, before any node starts
        self.config.transport.backend = resolve_backend(self.config.transport.backend, self.config.model.device)
        if not cluster.expert_addresses:
            scheme = "ucx" if self.config.transport.backend == "ucx" else "tcp"
            cluster.expert_addresses = [f"{scheme}://127.0.0.1:{free_port()}" for _ in range(cluster.expert_nodes)]
        if not cluster.expert_control_addresses:
            cluster.expert_control_addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(cluster.expert_nodes)]
        if not cluster.attention_addresses:
            cluster.attention_addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(cluster.attention_nodes)]
        self.config.transport.backend = settle_backend(self.config)  # lockstep: one backend, or a mix of them
        for note in self.notes():
            print(f"expertmesh: {note}", file=sys.stderr, flush=True)
        if uses_dist(self.config) and not cluster.dist_address:
            cluster.dist_address = f"tcp://127.0.0.1:{free_port()}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cluster.secret is None:
            cluster.secret = secrets.token_hex(16)
        config_path = self.run_dir / "cluster.json"
        config_path.touch(mode=0o600)  # it holds the cluster's secret
        self.config.validate().save(config_path)
        roles = [("expert node", "expertmesh.expert_node", cluster.expert_nodes),
                 ("attention node", "expertmesh.attention_node", cluster.attention_nodes),
                 ("gateway", "expertmesh.gateway", self.config.gateway.workers)]
        gateway_env = None
        if self.config.gateway.workers > 1:  # their counters and histograms shared (gateway/metrics.py), from zero
            shared = self.run_dir / "gateway_metrics"
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            gateway_env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)}  # prometheus-client's
        for name, module, count in roles:
            for index in range(count):
                command = [sys.executable, "-m", module, "--config", str(config_path), "--index", str(index)]
                env = gateway_env if module == "expertmesh.gateway" else None
                process = subprocess.Popen(command, preexec_fn=die_with_parent, env=env)
                self.children.append(Child(f"{name} {index}" if index or name != "gateway" else name, process,
                                           command, env=env))

    def notes(self) -> list[str]:
        """What the operator should know about this layout before it runs."""
        config, cluster = self.config, self.config.cluster
        if config.transport.backend != "ipc" or cluster.expert_nodes == 0:
            return []
        devices = ([config.node_device("attention", i) for i in range(cluster.attention_nodes)]
                   + [config.node_device("expert", i) for i in range(cluster.expert_nodes)])
        if len(set(devices)) == len(devices) or Path(MPS_PIPE).exists():
            return []
        return [f"nodes share {sorted({d for d in devices if devices.count(d) > 1})} over ipc links without CUDA MPS "
                f"({MPS_PIPE} is absent): their kernels take turns on the GPU, and every M2N round waits for a turn. "
                f"Start MPS first (nvidia-cuda-mps-control -d) for kernels of both to run at once."]

    def __enter__(self) -> "LocalCluster":
        """Started and serving (/health 200); stopped on the way out, also when the start fails."""
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Returns once /health is 200; raises ClusterError if a child dies or time runs out."""
        supervision.wait_healthy(self.url, self.children, timeout_s, self.config.gateway.workers)

    def supervise(self) -> None:
        """Restarts children that died, with backoff; ClusterError for one that cannot or died too often."""
        supervision.supervise(self.children, self.config)

    def summary(self) -> str:
        cluster = self.config.cluster
        return (f"{cluster.attention_nodes} attention and {cluster.expert_nodes} expert nodes serving "
                f"{self.config.model.path}, data path {data_path(self.config)}")

    def stop(self, grace_s: float = 10.0) -> None:
        """The gateway first (it would report the nodes' stopping as failures), then the nodes."""
        deadline = time.monotonic() + grace_s
        gateways = [child for child in self.children if supervision.is_gateway(child.name)]
        for group in (gateways, [child for child in self.children if not supervision.is_gateway(child.name)]):
            for child in reversed(group):
                if child.process.poll() is None:
                    child.process.terminate()
            for child in group:
                reap(child.process, child.name, deadline - time.monotonic(), grace_s)


def launch(config: Config, ready_timeout_s: float = 300.0) -> int:
    """The `expertmesh launch` command: run the cluster until signalled (exit 0) or a node dies (exit 1)."""
    return supervision.run(LocalCluster(config), ready_timeout_s)
