"""The launcher owns its children: SIGTERM leaves none behind; a killed expert node is restarted and the cluster
serves again within 30 s (a request in flight ends, never hangs); a node that keeps dying, or one on lockstep
links, stops the cluster with a non-zero exit that names it."""
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


def pid_of(launcher_pid: int, module: str, index: int) -> int | None:
    try:
        return role_pid(launcher_pid, module, index)
    except (LookupError, OSError):  # not (yet) there, or gone while read
        return None


def test_sigterm_stops_every_child(mixtral_dir):
    cluster = Cluster(mixtral_dir, attention_nodes=2, expert_nodes=2).wait_ready()
    children = child_pids(cluster.process.pid)
    assert len(children) == 2 + 2 + 1
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(timeout=30) == 0
    wait_for(lambda: not any(alive(pid) for pid in children), 10, "children to exit")
    cluster.reader.join(timeout=10)  # the log is complete once every child has closed its end of the pipe
    assert "Traceback" not in cluster.text(), cluster.text()  # a clean stop, not a cancelled task's dump


@pytest.mark.parametrize("transport", ["auto", "gloo"])
def test_killed_expert_node_is_restarted_and_the_cluster_serves_again(mixtral_dir, transport):
    """auto (ucx here): the node alone restarts. gloo (lockstep links): every attention and expert node restarts
    with it, a new world; the gateway stays up. Either way the launcher never exits and the greedy output is the
    same as before the kill."""
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=3,
                      extra=["--recv-timeout", "5", "--transport", transport]).wait_ready()
    greedy = {"prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    try:
        victim = role_pid(cluster.process.pid, "expertmesh.expert_node", 1)
        with cluster.client() as client, ThreadPoolExecutor(1) as pool:
            before = client.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
            # a long request in flight when the node dies must end, never hang: failed with an error or cut short
            # when the loss fails its step; whole when the loss falls between two steps over message links, since
            # the next step then waits for the node to rejoin (issue 12); which of the two is a matter of timing
            pending = pool.submit(client.post, "/v1/completions",
                                  json={"prompt": "hello", "max_tokens": 400, "ignore_eos": True})
            wait_for(lambda: prometheus.value(client.get("/metrics").text, "expertmesh_running_sequences",
                                              attention_node="0") == 1,
                     30, "the request to run")
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            response = pending.result(timeout=30)
            if response.status_code == 200:
                body = response.json()
                assert body["usage"]["completion_tokens"] < 400 or transport == "auto", body
                assert body["choices"][0]["finish_reason"] in ("length", "error", "abort"), body
            else:
                assert response.json()["error"]["message"], response.text

            def served_again():
                try:
                    r = client.post("/v1/completions", json=greedy)
                except httpx.HTTPError:
                    return False  # the gateway itself is never restarted here, but say so rather than crash
                return r.status_code == 200 and r.json()["choices"][0]["text"] == before

            try:
                wait_for(served_again, 30, "the cluster to serve again", interval_s=0.5)  # issue 12's target
            except TimeoutError:
                raise AssertionError(f"not serving 30 s after the kill:\n{cluster.text()}") from None
            recovered_s = time.monotonic() - killed_at
            restarted = ["expert_node_1"] + (["attention_node_0", "expert_node_0"] if transport == "gloo" else [])
            for node in restarted:
                wait_for(lambda: prometheus.value(client.get("/metrics").text, "expertmesh_node_restarts_total",
                                                  node=node) == 1, 30, f"{node}'s restart in /metrics")
        assert cluster.process.poll() is None  # the launcher never exited
        assert "expert node 1" in cluster.text() and "exited with code -9; restarting it" in cluster.text()
        assert ("stop and start again with it" in cluster.text()) == (transport == "gloo")
        print(f"serving again {recovered_s:.1f} s after the kill")
    finally:
        cluster.stop()


def test_a_node_that_keeps_dying_stops_the_cluster_and_lockstep_links_restart_together(tmp_path, monkeypatch):
    import subprocess
    import sys
    from expertmesh.config import Config
    from expertmesh.launcher import local, supervision
    cluster = local.LocalCluster(Config(), tmp_path)
    dying = [sys.executable, "-c", "raise SystemExit(3)"]
    cluster.children = [local.Child("expert node 0", subprocess.Popen(dying), dying)]
    monkeypatch.setattr(supervision, "DEATH_WINDOW_S", 3600.0)
    restarts = 0
    with pytest.raises(local.ClusterError, match=r"expert node 0 exited with code 3, its 6th death"):
        while True:
            cluster.children[0].process.wait()
            cluster.supervise()  # a death: restart due later
            cluster.children[0].restart_at = 0.0  # no need to wait out the backoff here
            cluster.supervise()  # the restart
            restarts += 1
    assert restarts == supervision.MAX_DEATHS
    cluster.config.transport.backend = "ipc"
    living = [sys.executable, "-c", "import time; time.sleep(60)"]
    cluster.children = [local.Child(name, subprocess.Popen(command), command) for name, command in
                        [("attention node 0", dying), ("expert node 0", living), ("gateway", living)]]
    dead, peer, gateway = cluster.children
    dead.process.wait()
    cluster.supervise()  # ipc links: the peer stops now and starts again with the dead node; the gateway stays
    assert peer.process.poll() is not None and peer.restart_at == dead.restart_at is not None and peer.deaths == []
    assert gateway.process.poll() is None and gateway.restart_at is None
    dead.restart_at = peer.restart_at = 0.0
    cluster.supervise()
    assert dead.restart_at is None and peer.restart_at is None and peer.process.poll() is None
    for child in cluster.children:
        child.kill()


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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_gateway_workers_share_the_port_and_each_serves(mixtral_dir):
    """--gateway-workers 2: two gateway processes on one port (SO_REUSEPORT). Requests on new connections spread
    over both (each spends a fair share of the gateways' CPU on them), and every one gets the same greedy text.
    /metrics counts every request whichever process answers it: each process alone counted its own share. A gateway
    process killed is restarted on the port and answers again."""
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=0, extra=["--gateway-workers", "2"]).wait_ready()
    try:
        gateways = [role_pid(cluster.process.pid, "expertmesh.gateway", index) for index in range(2)]
        greedy = {"prompt": "hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}

        def send(requests: int) -> list[str]:
            with ThreadPoolExecutor(4) as pool:  # each request on a connection of its own
                return list(pool.map(lambda _: httpx.post(f"{cluster.url}/v1/completions", json=greedy, timeout=60)
                                     .json()["choices"][0]["text"], range(requests)))

        send(8)  # each process's first requests pay one-time costs: not timed
        before = [cpu_seconds(pid) for pid in gateways]
        # enough requests that a one-off burst in one process (0.13 s of CPU, seen now and then) does not decide
        # the shares: 32 took 0.08 s in all
        texts = send(128)
        spent = [cpu_seconds(pid) - start for pid, start in zip(gateways, before)]
        assert len(set(texts)) == 1 and texts[0]
        assert min(spent) >= 0.2 * sum(spent), spent
        for _ in range(6):  # scrapes on new connections: both processes answer some
            text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
            assert prometheus.value(text, "expertmesh_requests_total", outcome="completed") == 136
            assert prometheus.value(text, "expertmesh_time_to_first_token_seconds_count") == 136
            assert prometheus.value(text, "expertmesh_generation_tokens_total") == 136 * 8
            assert prometheus.value(text, "expertmesh_requests_in_flight") == 0
        os.kill(gateways[1], signal.SIGKILL)
        wait_for(lambda: pid_of(cluster.process.pid, "expertmesh.gateway", 1) not in (None, gateways[1]), 30,
                 "gateway 1's restart")

        def worker_1_answers() -> bool:  # a new connection each time: the kernel hands it to one of the two
            response = httpx.get(f"{cluster.url}/health", timeout=10)
            return response.status_code == 200 and response.json().get("worker") == 1
        wait_for(worker_1_answers, 30, "the restarted gateway 1 to answer on the port")
        assert send(8) == texts[:8]
    finally:
        cluster.stop()
