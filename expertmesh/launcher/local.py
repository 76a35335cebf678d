"""Starts a whole cluster on this host as processes: expert nodes, attention nodes, then the gateway.

Waits until /health says every node is ready; stops every child on SIGTERM/SIGINT. Once serving, a child that
dies is restarted (same role, index, ports), after a backoff that doubles with each recent death; one that dies
too often stops the cluster with a non-zero exit that names it (so does any death during start-up, and any
death on lockstep links over nccl, gloo or ipc, whose peers cannot take a new process in mid-run)."""
from __future__ import annotations

import ctypes
import os
import secrets
import dataclasses
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..config import LOCKSTEP_BACKENDS, Config
from ..transport.base import resolve_backend


class ClusterError(RuntimeError):
    """A node of the cluster failed to start or died."""


_next_port = 20000 + os.getpid() % 10000
MPS_PIPE = "/tmp/nvidia-mps"  # where a CUDA MPS daemon started with default settings listens


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, below the kernel's ephemeral range (32768+), so that the ephemeral ports UCX
    and others bind on their own cannot take it between our choosing it and a node binding it."""
    global _next_port
    for _ in range(12000):
        port, _next_port = _next_port, 20000 + (_next_port - 20000 + 7) % 12000
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise ClusterError(f"no free port in 20000-31999 on {host}")


def _die_with_parent() -> None:
    """Children get SIGTERM if the launcher itself dies, so no node outlives it (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str  # e.g. "expert node 1"
    process: subprocess.Popen
    command: list[str]
    deaths: list[float] = dataclasses.field(default_factory=list)  # monotonic times, the recent ones
    restart_at: float | None = None  # when a restart is due


MAX_DEATHS = 5  # per child within DEATH_WINDOW_S; one more stops the cluster
DEATH_WINDOW_S = 60.0


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
        self.config.transport.backend = resolve_backend(self.config.transport.backend, self.config.model.device)
        for note in self.notes():
            print(f"expertmesh: {note}", file=sys.stderr, flush=True)
        if not cluster.expert_addresses:
            scheme = "ucx" if self.config.transport.backend == "ucx" else "tcp"
            cluster.expert_addresses = [f"{scheme}://127.0.0.1:{free_port()}" for _ in range(cluster.expert_nodes)]
        if not cluster.expert_control_addresses:
            cluster.expert_control_addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(cluster.expert_nodes)]
        if self.config.transport.backend in ("nccl", "gloo") and not cluster.dist_address:
            cluster.dist_address = f"tcp://127.0.0.1:{free_port()}"
        if not cluster.attention_addresses:
            cluster.attention_addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(cluster.attention_nodes)]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cluster.secret is None:
            cluster.secret = secrets.token_hex(16)
        config_path = self.run_dir / "cluster.json"
        config_path.touch(mode=0o600)  # it holds the cluster's secret
        self.config.validate().save(config_path)
        roles = [("expert node", "expertmesh.expert_node", cluster.expert_nodes),
                 ("attention node", "expertmesh.attention_node", cluster.attention_nodes),
                 ("gateway", "expertmesh.gateway", 1)]
        for name, module, count in roles:
            for index in range(count):
                command = [sys.executable, "-m", module, "--config", str(config_path), "--index", str(index)]
                process = subprocess.Popen(command, preexec_fn=_die_with_parent)
                self.children.append(Child(name if name == "gateway" else f"{name} {index}", process, command))

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

    def check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise ClusterError(f"{child.name} (pid {child.process.pid}) exited with code {code}")

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Returns once /health is 200; raises ClusterError if a child dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_children()
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ClusterError(f"cluster not ready within {timeout_s} s")

    def wait(self) -> None:
        """Serves until the launcher is signalled (KeyboardInterrupt) or a child dies too often (ClusterError)."""
        while True:
            self.supervise()
            time.sleep(0.2)

    def supervise(self) -> None:
        """Restarts children that died, with backoff; ClusterError for one that cannot or died too often."""
        now = time.monotonic()
        for child in self.children:
            code = child.process.poll()
            if code is None:
                continue
            if child.restart_at is None:  # a new death
                if self.config.transport.backend in LOCKSTEP_BACKENDS and self.config.cluster.expert_nodes:
                    raise ClusterError(f"{child.name} (pid {child.process.pid}) exited with code {code}; its "
                                       f"{self.config.transport.backend} links cannot take a restarted node")
                child.deaths = [t for t in child.deaths if now - t < DEATH_WINDOW_S] + [now]
                if len(child.deaths) > MAX_DEATHS:
                    raise ClusterError(f"{child.name} exited with code {code}, its {len(child.deaths)}th death "
                                       f"within {DEATH_WINDOW_S:.0f} s")
                backoff = min(30.0, 2.0 ** (len(child.deaths) - 1))
                child.restart_at = now + backoff
                print(f"expertmesh: {child.name} (pid {child.process.pid}) exited with code {code}; restarting it "
                      f"in {backoff:.0f} s", file=sys.stderr, flush=True)
            elif now >= child.restart_at:
                child.process = subprocess.Popen(child.command, preexec_fn=_die_with_parent)
                child.restart_at = None
                print(f"expertmesh: {child.name} restarted (pid {child.process.pid})", file=sys.stderr, flush=True)

    def stop(self, grace_s: float = 10.0) -> None:
        """The gateway first (it would report the nodes' stopping as failures), then the nodes."""
        deadline = time.monotonic() + grace_s
        gateway = [child for child in self.children if child.name == "gateway"]
        for group in (gateway, [child for child in self.children if child.name != "gateway"]):
            for child in reversed(group):
                if child.process.poll() is None:
                    child.process.terminate()
            for child in group:
                try:
                    child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()


def launch(config: Config, ready_timeout_s: float = 300.0) -> int:
    """The `expertmesh launch` command: run the cluster until signalled (exit 0) or a node dies (exit 1)."""
    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    cluster = LocalCluster(config)
    try:
        cluster.start()
        print(f"expertmesh: starting {config.cluster.attention_nodes} attention and {config.cluster.expert_nodes} "
              f"expert nodes serving {config.model.path}, data path {cluster.config.transport.backend} ...",
              flush=True)
        cluster.wait_ready(ready_timeout_s)
        print(f"expertmesh: ready at {cluster.url}  (OpenAI API under {cluster.url}/v1)", flush=True)
        cluster.wait()
    except KeyboardInterrupt:
        print("expertmesh: stopping", flush=True)
        return 0
    except ClusterError as exc:
        print(f"expertmesh: {exc}; stopping the cluster", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
        cluster.stop()
    return 0
