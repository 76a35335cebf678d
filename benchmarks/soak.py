"""A soak: a local cluster under a mixed workload while one node is killed (SIGKILL) every --kill-every seconds,
attention and expert nodes in turn. Every request must end — completed, or failed with a clear error — none may
hang or be lost; prints the tally and the longest time from a kill to the next completed request.

    python benchmarks/soak.py --duration 600 --kill-every 120 --json soak.json    # the issue's 10 minutes
    python benchmarks/soak.py --duration 60 --kill-every 20                       # the CI version (tests/)
    python benchmarks/soak.py --duration 120 --kill-every 30 --kill expert --replicate   # replicas: nothing fails

Workload, per client in a loop: non-streamed completions (60%), streams read to the end (25%), streams dropped
after their first token (10%), malformed requests that must get a 4xx (5%)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from expertmesh.config import Config
from expertmesh.launcher.local import LocalCluster, free_port
from expertmesh.model.spec import ModelSpec
from expertmesh.placement.plan import Placement

REQUEST_DEADLINE_S = 60.0  # a request not ended by then counts as hung


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed_clearly: int = 0  # an error status with an error body, or a stream ending in an error event
    dropped_by_client: int = 0  # streams the client closed after the first token, on purpose
    rejected_as_malformed: int = 0
    hung: int = 0
    kills: list[tuple[float, str]] = field(default_factory=list)
    completions_at: list[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.sent - (self.completed + self.failed_clearly + self.dropped_by_client
                            + self.rejected_as_malformed + self.hung)

    def longest_recovery_s(self, ended: float) -> float:
        """Over the kills: time to the first completion after each (to the end of the run if none came)."""
        return max((next((t for t in self.completions_at if t > at), ended) - at for at, _ in self.kills),
                   default=0.0)


async def one_request(client: httpx.AsyncClient, kind: str, tally: Tally, rng: random.Random) -> None:
    tally.sent += 1
    body = {"prompt": rng.choice(["hello", "def f(x):", "la la la", "the"]), "max_tokens": rng.randint(4, 24)}
    try:
        async with asyncio.timeout(REQUEST_DEADLINE_S):
            if kind == "malformed":
                response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": "ten"})
                if 400 <= response.status_code < 500 and "error" in response.json():
                    tally.rejected_as_malformed += 1
                else:
                    tally.failed_clearly += 1  # answered, but not as it should: counted, not lost
                return
            if kind == "plain":
                response = await client.post("/v1/completions", json=body)
                if response.status_code == 200:
                    tally.completed += 1
                    tally.completions_at.append(time.monotonic())
                else:
                    assert "error" in response.json(), response.text
                    tally.failed_clearly += 1
                return
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                if response.status_code != 200:
                    await response.aread()
                    tally.failed_clearly += 1
                    return
                async for line in response.aiter_lines():
                    event = json.loads(line[6:]) if line.startswith("data: {") else None
                    if event is not None and "error" in event:
                        tally.failed_clearly += 1
                        return
                    if kind == "dropped" and event is not None:
                        tally.dropped_by_client += 1
                        return
                    if line == "data: [DONE]":
                        tally.completed += 1
                        tally.completions_at.append(time.monotonic())
                        return
                tally.failed_clearly += 1  # the stream ended without [DONE]: the client sees it end
    except TimeoutError:
        tally.hung += 1
    except httpx.HTTPError:
        tally.failed_clearly += 1  # the connection failed: the client is told


async def clients(url: str, count: int, until: float, tally: Tally, seed: int) -> None:
    kinds = ["plain"] * 12 + ["stream"] * 5 + ["dropped"] * 2 + ["malformed"]

    async def loop(i: int) -> None:
        rng = random.Random(seed + i)
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_DEADLINE_S + 5) as client:
            while time.monotonic() < until:
                await one_request(client, rng.choice(kinds), tally, rng)

    await asyncio.gather(*(loop(i) for i in range(count)))


async def killer(cluster: LocalCluster, every_s: float, until: float, tally: Tally,
                 kill_roles: tuple[str, ...] = ("attention", "expert")) -> None:
    roles = [[c for c in cluster.children if c.name.startswith(role)] for role in kill_roles]
    turn = 0
    while time.monotonic() + every_s < until:
        await asyncio.sleep(every_s)
        nodes = roles[turn % len(roles)]  # the roles in turn, each index in turn
        victim = nodes[(turn // len(roles)) % len(nodes)]
        turn += 1
        if victim.process.poll() is None:
            os.kill(victim.process.pid, signal.SIGKILL)
            tally.kills.append((time.monotonic(), victim.name))
            print(f"soak: killed {victim.name}", file=sys.stderr, flush=True)


def soak(model: str, duration_s: float, kill_every_s: float, concurrency: int, seed: int = 0,
         kill_roles: tuple[str, ...] = ("attention", "expert"), replicate: bool = False) -> dict:
    config = Config()
    config.model.path = model
    config.cluster.attention_nodes, config.cluster.expert_nodes = 2, 2
    if replicate:  # every expert on both expert nodes: a lost one loses nothing
        spec = ModelSpec.from_dir(model)
        path = Path(tempfile.mkdtemp(prefix="soak-")) / "replicated.json"
        path.write_text(Placement(2, {layer: [[0, 1] if e < spec.num_experts // 2 else [1, 0]
                                              for e in range(spec.num_experts)]
                                      for layer in spec.moe_layer_ids}).to_json())
        config.cluster.placement = str(path)
    config.transport.recv_timeout_s = 5.0
    config.gateway.port = free_port()
    tally = Tally()
    with LocalCluster(config) as cluster:

        async def run() -> None:
            until = time.monotonic() + duration_s
            supervise = asyncio.create_task(_supervise(cluster))
            try:
                await asyncio.gather(clients(cluster.url, concurrency, until, tally, seed),
                                     killer(cluster, kill_every_s, until, tally, kill_roles))
            finally:
                supervise.cancel()

        started = time.monotonic()
        asyncio.run(run())
        ended = time.monotonic()
    report = {k: v for k, v in asdict(tally).items() if k not in ("kills", "completions_at")}
    report.update(lost=tally.lost, kills=[name for _, name in tally.kills], duration_s=round(ended - started, 1),
                  longest_recovery_s=round(tally.longest_recovery_s(ended), 1))
    return report


async def _supervise(cluster: LocalCluster) -> None:
    """The launcher's loop (LocalCluster.wait), beside the workload."""
    while True:
        cluster.supervise()
        await asyncio.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/expertmesh-mini")
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--kill-every", type=float, default=120.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--kill", default="attention,expert", help="roles whose nodes are killed in turn")
    p.add_argument("--replicate", action="store_true", help="every expert on both expert nodes")
    p.add_argument("--json")
    args = p.parse_args()
    report = soak(args.model, args.duration, args.kill_every, args.concurrency,
                  kill_roles=tuple(args.kill.split(",")), replicate=args.replicate)
    print("| " + " | ".join(report) + " |")
    print("| " + " | ".join(str(v) for v in report.values()) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0 if report["hung"] == 0 and report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
