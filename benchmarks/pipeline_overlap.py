"""Does ping-pong pay? Decode throughput of one attention node and its expert node(s) at m = 1, 2, 3.

Drives the attention node over its control link directly (the gateway's own client class, no HTTP), so
that on a small host the gateway and an HTTP client do not compete with the nodes for cores: a fixed
batch of greedy requests is submitted at once, and decode is timed from the moment every request has
its first token to the last token. Settings run in interleaved rounds (m=1, m=2, ... then again) so that
drift of a shared machine spreads over all of them. Tokens must be identical across settings.

    python benchmarks/pipeline_overlap.py --model /tmp/overlap-model --microbatches 1 2 \\
        --emulated-latency-us 0 1000 --batch 128 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import torch

from expertmesh.config import Config
from expertmesh.gateway.nodes import AttentionNodeClient, NodeLink
from expertmesh.launcher.local import LocalCluster, free_port
from expertmesh.transport.protocol import SamplingParams
from expertmesh.transport.zmq import ZmqTransport


def _busy(status) -> tuple[float, float]:
    """(seconds in timed phases, wall seconds) of a node's status."""
    return sum(status.phase_seconds), status.wall_seconds


async def _fresh_status(link: NodeLink, timeout_s: float = 10.0):
    """A status sent after this call (the link polls every 0.25 s)."""
    since = time.monotonic()
    deadline = since + timeout_s
    while link.last_heard <= since or link.status is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{link.name} sent no status within {timeout_s} s")
        await asyncio.sleep(0.05)
    return link.status


async def measure(config: Config, prompts: list[list[int]], output_len: int) -> dict:
    transport = ZmqTransport()
    node = AttentionNodeClient(0, await transport.connect(config.cluster.attention_addresses[0]), 30.0)
    experts = [NodeLink(f"expert node {i}", await transport.connect(a), 30.0)
               for i, a in enumerate(config.cluster.expert_control_addresses)]
    for link in [node, *experts]:
        link.start()
    sampling = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    queues = [await node.submit(f"r{i}", p, sampling) for i, p in enumerate(prompts)]
    outputs: list[list[int]] = [[] for _ in prompts]

    async def first(i: int) -> None:
        event = await queues[i].get()
        if event.error:
            raise RuntimeError(event.error)
        outputs[i].append(event.token_id)

    await asyncio.wait_for(asyncio.gather(*(first(i) for i in range(len(prompts)))), 300)
    before = [await _fresh_status(link) for link in [node, *experts]]
    start = time.perf_counter()

    async def rest(i: int) -> None:
        while len(outputs[i]) < output_len:
            event = await queues[i].get()
            if event.error:
                raise RuntimeError(event.error)
            outputs[i].append(event.token_id)

    await asyncio.wait_for(asyncio.gather(*(rest(i) for i in range(len(prompts)))), 600)
    elapsed = time.perf_counter() - start
    after = [await _fresh_status(link) for link in [node, *experts]]
    idle = {}
    for link, b, a in zip([node, *experts], before, after):
        (busy0, wall0), (busy1, wall1) = _busy(b), _busy(a)
        idle[link.name] = 1.0 - (busy1 - busy0) / max(wall1 - wall0, 1e-9)
    steps = after[0].steps - before[0].steps
    for link in [node, *experts]:
        await link.close()
    decode_tokens = len(prompts) * (output_len - 1)
    return {"decode_tok_s": decode_tokens / elapsed, "step_ms": 1e3 * elapsed / max(steps, 1), "steps": steps,
            "idle": idle, "outputs": outputs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--emulated-latency-us", type=float, nargs="+", default=[0.0])
    p.add_argument("--emulated-bandwidth-gbps", type=float, default=0.0)
    p.add_argument("--expert-nodes", type=int, default=1)
    p.add_argument("--batch", type=int, default=64, help="requests decoded together")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--transport", choices=["zmq", "ucx"], default="zmq")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--json", help="write every run here")
    args = p.parse_args()

    vocab = json.load(open(f"{args.model}/config.json"))["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=generator).tolist()
    runs, reference = [], None
    for latency in args.emulated_latency_us:
        for round_ in range(args.rounds):
            for m in args.microbatches:
                config = Config()
                config.model.path, config.model.device, config.model.dtype = args.model, args.device, args.dtype
                config.cluster.attention_nodes, config.cluster.expert_nodes = 1, args.expert_nodes
                config.engine.microbatches = m
                config.engine.max_num_seqs = args.batch
                config.engine.max_batch_tokens = max(2048, args.batch * args.prompt_len)
                config.transport.backend = args.transport
                config.transport.emulated_latency_us = latency
                config.transport.emulated_bandwidth_gbps = args.emulated_bandwidth_gbps
                config.gateway.port = free_port()
                with LocalCluster(config) as cluster:
                    result = asyncio.run(measure(cluster.config, prompts, args.output_len))
                outputs = result.pop("outputs")
                reference = reference or outputs
                result.update(latency_us=latency, microbatches=m, round=round_, identical=outputs == reference)
                runs.append(result)
                idle = ", ".join(f"{k} {v:.0%}" for k, v in result["idle"].items())
                print(f"latency {latency:6.0f} us  m={m}  round {round_}: {result['decode_tok_s']:8.1f} tok/s  "
                      f"step {result['step_ms']:6.2f} ms  idle: {idle}  identical: {result['identical']}", flush=True)
    print("\n| one-way latency | m | decode tok/s (median of rounds) | step ms | idle attention | idle expert |")
    print("|---|---|---|---|---|---|")
    for latency in args.emulated_latency_us:
        for m in args.microbatches:
            mine = [r for r in runs if r["latency_us"] == latency and r["microbatches"] == m]
            med = lambda key: statistics.median(r[key] for r in mine)  # noqa: E731
            idle_a = statistics.median(r["idle"]["attention node 0"] for r in mine)
            idle_e = statistics.median(r["idle"]["expert node 0"] for r in mine)
            spread = ", ".join(f"{r['decode_tok_s']:.0f}" for r in mine)
            print(f"| {latency:.0f} us | {m} | {med('decode_tok_s'):.1f} ({spread}) | {med('step_ms'):.2f} | "
                  f"{idle_a:.0%} | {idle_e:.0%} |")
    print("tokens identical across all runs:", all(r["identical"] for r in runs))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "runs": runs}, handle, indent=2)
    return 0 if all(r["identical"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
