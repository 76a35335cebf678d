"""Runs `expertmesh launch` as a real subprocess on a free port and waits, with a timeout, until it is ready."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from expertmesh.launcher.local import free_port


def child_pids(pid: int) -> list[int]:
    """Direct children of pid, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.05):
    """Polls condition() until it returns something truthy; fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


class Cluster:
    def __init__(self, model_dir, attention_nodes: int = 2, expert_nodes: int = 3, extra: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "expertmesh", "launch", "--model", str(model_dir), "--attention-nodes",
                   str(attention_nodes), "--expert-nodes", str(expert_nodes), "--port", str(self.port),
                   "--max-num-seqs", "16", *(extra or [])]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.output: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            if "ready at" in line:
                self.ready.set()
        self.ready.set()  # exited: wait_ready sees it is not serving

    def wait_ready(self, timeout_s: float = 120.0) -> "Cluster":
        if not self.ready.wait(timeout_s) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError("cluster did not become ready:\n" + self.text())
        return self

    def text(self) -> str:
        return "".join(self.output)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.reader.join(timeout=10)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120.0)
