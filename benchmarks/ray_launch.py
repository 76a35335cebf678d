"""`expertmesh launch --ray` timed on one machine: a ray.cluster_utils cluster of a head (launcher and gateway) and two
"hosts" (one for the attention nodes, one for the expert nodes), the same layout launched locally beside it.

Prints seconds from launch to ready (locally and on Ray), from an expert node's SIGKILL to serving again, from the
SIGKILL of the attention node's Ray actor to serving again (a new actor on the same host), and from the expert
host's removal to the launcher's exit (code 1, naming the host).

    python benchmarks/ray_launch.py --model /tmp/tiny-mixtral --attention-nodes 1 --expert-nodes 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from expertmesh.launcher.node_host import free_port


class Launch:
    """`expertmesh launch` as a subprocess; its output kept, with the time each line came."""

    def __init__(self, args: argparse.Namespace, extra: list[str]) -> None:
        self.port = free_port()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "expertmesh", "launch", "--model", args.model, "--attention-nodes",
             str(args.attention_nodes), "--expert-nodes", str(args.expert_nodes), "--port", str(self.port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line))

    def wait_line(self, pattern: str, timeout_s: float = 300.0) -> tuple[float, re.Match]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return at, match
            if self.process.poll() is not None and not any(re.search(pattern, line) for _, line in self.lines):
                raise RuntimeError("launcher exited:\n" + "".join(line for _, line in self.lines[-40:]))
            time.sleep(0.05)
        raise TimeoutError(f"no line matching {pattern!r} within {timeout_s} s")

    def serves(self) -> bool:
        try:
            r = httpx.post(f"http://127.0.0.1:{self.port}/v1/completions", json={"prompt": "hello", "max_tokens": 4},
                           timeout=30)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--attention-nodes", type=int, default=1)
    parser.add_argument("--expert-nodes", type=int, default=2)
    args = parser.parse_args()
    from ray.cluster_utils import Cluster as RayHosts

    report = {}
    local = Launch(args, [])
    at, _ = local.wait_line("ready at")
    report["local_ready_s"] = round(at - local.started, 1)
    local.stop()

    hosts = RayHosts(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        hosts.add_node(num_cpus=args.attention_nodes, resources={"attention_host": args.attention_nodes})
        expert_host = hosts.add_node(num_cpus=args.expert_nodes, resources={"expert_host": args.expert_nodes})
        hosts.wait_for_nodes()
        config = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump({"cluster": {"ray_resources": {"attention": {"attention_host": 1}, "expert": {"expert_host": 1}}}},
                  config)
        config.close()
        on_ray = Launch(args, ["--ray", hosts.address, "--config", config.name])
        at, _ = on_ray.wait_line("ready at")
        report["ray_ready_s"] = round(at - on_ray.started, 1)
        _, match = on_ray.wait_line(r"expert node 0: pid (\d+) on")
        killed_at = time.monotonic()
        os.kill(int(match.group(1)), signal.SIGKILL)
        on_ray.wait_line("expert node 0 restarted", 60)
        while not on_ray.serves():
            time.sleep(0.1)
        report["ray_kill_to_serving_s"] = round(time.monotonic() - killed_at, 1)
        # the attention node's actor (its process's parent) killed on a live host: a new actor there restarts it
        _, match = on_ray.wait_line(r"attention node 0: pid (\d+) on")
        actor_pid = int(open(f"/proc/{match.group(1)}/stat").read().rsplit(")", 1)[1].split()[1])
        killed_at = time.monotonic()
        os.kill(actor_pid, signal.SIGKILL)
        on_ray.wait_line("attention node 0 restarted", 60)
        while not on_ray.serves():
            time.sleep(0.1)
        report["ray_actor_kill_to_serving_s"] = round(time.monotonic() - killed_at, 1)
        removed_at = time.monotonic()
        hosts.remove_node(expert_host, allow_graceful=False)
        at, match = on_ray.wait_line(r"expertmesh: (.*is lost.*)", 120)
        report["ray_host_lost_to_stop_s"] = round(at - removed_at, 1)
        report["ray_exit_code"] = on_ray.process.wait(timeout=60)
        report["ray_host_lost_message"] = match.group(1)[:160]
        os.unlink(config.name)
    finally:
        hosts.shutdown()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
