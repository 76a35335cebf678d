"""When a node that died is restarted and when the whole cluster stops instead: the policy both launchers share
(launcher/local.py on one host, launcher/ray_cluster.py across the hosts of a Ray cluster), and their run loop.

A node that dies once serving is restarted after a backoff that doubles with each recent death; one that dies more
than MAX_DEATHS times within DEATH_WINDOW_S stops the cluster, as does any death during start-up. On lockstep links
(nccl, gloo, ipc, ucx-lockstep) the peers cannot take a new process in mid-run (a torch.distributed world, IPC regions
and counts, CUDA graphs holding the old addresses): there every attention and expert node is stopped and started
again with the one that died, a new world, while the gateway stays up and answers for them."""
from __future__ import annotations

import json
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Iterable, Protocol

from ..config import LOCKSTEP_BACKENDS, Config
from . import ClusterError

MAX_DEATHS = 5  # per node within DEATH_WINDOW_S; one more stops the cluster
DEATH_WINDOW_S = 60.0
MAX_BACKOFF_S = 30.0
POLL_S = 0.2


class Supervised(Protocol):
    """A node as a launcher runs it: a process it can poll and start again, on this host or another."""
    name: str  # e.g. "expert node 1"
    deaths: list[float]  # monotonic times of its recent deaths
    restart_at: float | None  # when a restart is due

    def exit_code(self) -> int | None:
        """None while it runs; ClusterError when it cannot be known (its host is lost)."""

    def where(self) -> str:
        """Its process, for messages: "pid 123" or "pid 123 on 10.0.0.2"."""

    def restart(self) -> None:
        """Starts it again, same role, index, config and ports."""

    def kill(self) -> None:
        """Stops it at once (it is to start again with the others: its links' world is gone)."""


class Launched(Protocol):
    """A cluster a launcher started: LocalCluster or RayCluster."""
    url: str

    def start(self) -> None: ...
    def wait_ready(self, timeout_s: float) -> None: ...
    def supervise(self) -> None: ...
    def stop(self) -> None: ...
    def summary(self) -> str: ...


def check_started(nodes: Iterable[Supervised]) -> None:
    """ClusterError for a node that exited while the cluster starts: nothing restarts it then."""
    for node in nodes:
        code = node.exit_code()
        if code is not None:
            raise ClusterError(f"{node.name} ({node.where()}) exited with code {code}")


def supervise(nodes: Iterable[Supervised], config: Config, now: float | None = None) -> None:
    """Restarts nodes that died, with backoff; ClusterError for one that cannot be restarted or died too often."""
    now = time.monotonic() if now is None else now
    nodes = list(nodes)
    lockstep = config.transport.backend in LOCKSTEP_BACKENDS and config.cluster.expert_nodes > 0
    for node in nodes:
        code = node.exit_code()
        if code is None:
            continue
        if node.restart_at is None:  # a new death
            node.deaths = [t for t in node.deaths if now - t < DEATH_WINDOW_S] + [now]
            if len(node.deaths) > MAX_DEATHS:
                raise ClusterError(f"{node.name} exited with code {code}, its {len(node.deaths)}th death "
                                   f"within {DEATH_WINDOW_S:.0f} s")
            backoff = min(MAX_BACKOFF_S, 2.0 ** (len(node.deaths) - 1))
            node.restart_at = now + backoff
            print(f"expertmesh: {node.name} ({node.where()}) exited with code {code}; restarting it in "
                  f"{backoff:.0f} s", file=sys.stderr, flush=True)
            if lockstep and not is_gateway(node.name):
                _restart_world(nodes, node, config.transport.backend)
        elif now >= node.restart_at:
            node.restart()
            node.restart_at = None
            print(f"expertmesh: {node.name} restarted ({node.where()})", file=sys.stderr, flush=True)


GATEWAY = "gateway"  # the gateway processes ("gateway", "gateway 1", ...): outside the links' world


def is_gateway(name: str) -> bool:
    return name == GATEWAY or name.startswith(GATEWAY + " ")


def _restart_world(nodes: list[Supervised], died: Supervised, backend: str) -> None:
    """Every other attention and expert node stops now and starts again with `died` (their deaths not counted)."""
    others = [n for n in nodes if n is not died and not is_gateway(n.name) and n.restart_at is None]
    for node in others:
        node.kill()
        node.restart_at = died.restart_at
    print(f"expertmesh: {backend} links cannot take a new {died.name} alone: "
          f"{', '.join(n.name for n in others)} stop and start again with it", file=sys.stderr, flush=True)


def wait_healthy(url: str, nodes: Iterable[Supervised], timeout_s: float, workers: int = 1) -> None:
    """Returns once url/health is 200 from each of `workers` gateway processes; ClusterError if a node exits first
    or time runs out. The processes share the port: each answer names its worker, and each poll is a new connection,
    which the kernel gives to one of those listening. A worker that binds the port late would otherwise take no
    connection while the others already serve (a benchmark's first burst all on one of them)."""
    nodes = list(nodes)
    deadline = time.monotonic() + timeout_s
    serving: set[int] = set()
    while time.monotonic() < deadline:
        check_started(nodes)
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    serving.add(json.loads(response.read() or b"{}").get("worker", 0))
                    if len(serving) >= workers:
                        return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(POLL_S / 10 if serving else POLL_S)  # the others are near once one serves
    raise ClusterError(f"cluster not ready within {timeout_s} s" + (
        f" (gateway workers serving: {sorted(serving)} of {workers})" if serving else ""))


def run(cluster: Launched, ready_timeout_s: float) -> int:
    """The `expertmesh launch` command around a cluster: serve until signalled (exit 0) or a node dies beyond
    what supervision mends (exit 1), then stop every node."""
    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        signal.signal(signal.SIGTERM, on_signal)  # again: ray.init puts a handler of its own in its place
        print(f"expertmesh: starting {cluster.summary()} ...", flush=True)
        cluster.wait_ready(ready_timeout_s)
        print(f"expertmesh: ready at {cluster.url}  (OpenAI API under {cluster.url}/v1)", flush=True)
        while True:
            cluster.supervise()
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print("expertmesh: stopping", flush=True)
        return 0
    except ClusterError as exc:
        print(f"expertmesh: {exc}; stopping the cluster", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
        cluster.stop()
