"""One node's process on the host it runs on: ports free there for it to bind, its start and restart, its death
with its parent. launcher/local.py uses these on this host; launcher/ray_cluster.py runs a NodeHost as a Ray actor
on each host (no torch imported here, so that those actors start in a fraction of a second)."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import ClusterError

_next_port = 20000 + os.getpid() % 10000


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


def die_with_parent() -> None:
    """Children get SIGTERM if the launcher itself dies, so no node outlives it (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reap(process: subprocess.Popen, name: str, wait_s: float, grace_s: float) -> None:
    """Waits up to wait_s for a process told to stop (SIGTERM); one still running then is named on stderr and
    killed, so that a node slow to stop is seen rather than silently waited for."""
    try:
        process.wait(timeout=max(0.0, wait_s))
    except subprocess.TimeoutExpired:
        print(f"expertmesh: {name} (pid {process.pid}) had not stopped {grace_s:g} s after SIGTERM; killing it",
              file=sys.stderr, flush=True)
        process.kill()
        process.wait()


class NodeHost:
    """One node's process on the host Ray placed it on. A Ray actor (RayCluster applies ray.remote), so its
    methods run on that host."""

    def __init__(self, name: str) -> None:
        self.name = name  # e.g. "expert node 1"
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.run_dir = Path(tempfile.mkdtemp(prefix="expertmesh-"))

    def __repr__(self) -> str:
        return self.name  # Ray prefixes the node's log lines with it

    def reserve(self, ports: int) -> tuple[str, str, list[int]]:
        """This host's address, its Ray node id, and `ports` ports free on it for the node to bind."""
        import ray
        host = ray.util.get_node_ip_address()
        return host, ray.get_runtime_context().get_node_id(), [free_port(host) for _ in range(ports)]

    def start(self, config: dict[str, Any], module: str, index: int) -> int:
        """Runs `python -m module` for node `index` of the cluster `config` describes; its pid."""
        path = self.run_dir / "cluster.json"
        path.touch(mode=0o600)  # it holds the cluster's secret
        path.write_text(json.dumps(config))
        self.command = [sys.executable, "-m", module, "--config", str(path), "--index", str(index)]
        return self.restart()

    def restart(self) -> int:
        self.process = subprocess.Popen(self.command, preexec_fn=die_with_parent)
        return self.process.pid

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process else None

    def kill(self) -> None:
        """The node's process at once, its run directory kept (it starts again)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, grace_s: float) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            reap(self.process, self.name, grace_s, grace_s)
        shutil.rmtree(self.run_dir, ignore_errors=True)
