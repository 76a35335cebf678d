"""Serves one model at several microbatch counts (and optional link emulation) and runs the same
seeded `bench serve` workload against each; prints one row per setting.

    python benchmarks/microbatch_sweep.py --model models/expertmesh-mini --microbatches 1 2 3 \
        --emulated-latency-us 3000 --concurrency 16 --num-requests 48
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import uvloop

from expertmesh.bench.serve import Workload, run
from expertmesh.config import IPC_COPIES, Config, EngineConfig
from expertmesh.launcher.local import LocalCluster, free_port
from expertmesh.launcher.node_host import cpu_seconds as node_cpu_seconds


def cpu_seconds(cluster: LocalCluster) -> dict[str, float]:
    """CPU seconds (user + system, every thread) each process of the cluster has used so far, from /proc: what its
    phase clock does not see too (transport threads, the event loop)."""
    return {child.name: node_cpu_seconds(child.process.pid) for child in cluster.children}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/expertmesh-mini")
    p.add_argument("--config", help="base config (YAML/JSON); the flags below override it")
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--attention-nodes", type=int, default=1)
    p.add_argument("--expert-nodes", type=int, default=1)
    p.add_argument("--emulated-latency-us", type=float, default=0.0)
    p.add_argument("--emulated-bandwidth-gbps", type=float, default=0.0)
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, nargs=2, default=[32, 64])
    p.add_argument("--output-len", type=int, nargs=2, default=[32, 64])
    p.add_argument("--client-processes", type=int, default=1,
                   help="processes sending the requests (bench serve --client-processes; one tops out near 50k tok/s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--transport", choices=["zmq", "ucx", "nccl", "ipc", "gloo"], default="zmq")
    p.add_argument("--ipc-copy", choices=IPC_COPIES, default="engine",
                   help="ipc links: the driver's copies, or one SM kernel per send (transport.ipc_copy)")
    p.add_argument("--gateway-workers", type=int, default=1, help="gateway processes on the port (gateway.workers)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-waiting-steps", type=int, default=0,
                   help="while sequences decode, steps new prompts may wait to join together (engine.max_waiting_steps)")
    p.add_argument("--prefill-graph-tokens", type=int,
                   help="steps with prompts replay CUDA graphs up to this many tokens (engine.prefill_graph_tokens; "
                        "0: eagerly)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="each step launched while the previous one runs (engine.async_scheduling; default: on for "
                        "cuda); the JSON records what ran")
    p.add_argument("--sm-percent", type=int, nargs=2, metavar=("ATTENTION", "EXPERT"),
                   help="under CUDA MPS, each role's share of the SMs in percent (cluster.*_sm_percent)")
    p.add_argument("--json", help="write all reports here")
    p.add_argument("--trace", help="write each measured run's phase trace (Chrome JSON) here, m=N before the suffix "
                   "when several")
    args = p.parse_args()
    try:
        Workload(concurrency=args.concurrency, client_processes=args.client_processes).check()
    except ValueError as exc:
        p.error(f"--client-processes: {exc}")
    args.async_scheduling = EngineConfig(async_scheduling=args.async_scheduling).async_scheduling_on(args.device)

    base = Config.load(args.config) if args.config else Config()
    rows = []
    for m in args.microbatches:
        config = dataclasses.replace(base)
        config.model.path = args.model
        config.cluster.attention_nodes, config.cluster.expert_nodes = args.attention_nodes, args.expert_nodes
        config.engine.microbatches = m
        config.engine.max_num_seqs = args.max_num_seqs
        config.engine.max_waiting_steps = args.max_waiting_steps
        if args.prefill_graph_tokens is not None:
            config.engine.prefill_graph_tokens = args.prefill_graph_tokens
        config.engine.async_scheduling = args.async_scheduling
        config.model.device, config.model.dtype, config.transport.backend = args.device, args.dtype, args.transport
        config.transport.ipc_copy = args.ipc_copy
        config.gateway.workers = args.gateway_workers
        if args.sm_percent:
            config.cluster.attention_sm_percent, config.cluster.expert_sm_percent = args.sm_percent
        config.transport.emulated_latency_us = args.emulated_latency_us
        config.transport.emulated_bandwidth_gbps = args.emulated_bandwidth_gbps
        config.gateway.port = free_port()
        with LocalCluster(config) as cluster:
            workload = Workload(args.num_requests, tuple(args.input_len), tuple(args.output_len), args.concurrency,
                                client_processes=args.client_processes)
            # warm-up; on a GPU one full batch, so that the measured run starts with every batch size's kernels
            # loaded (8 requests left the first configuration of a fresh GPU machine cold: 0.5-1.2 s TTFT, RESULTS.md)
            warm = max(8, min(args.concurrency, args.num_requests)) if args.device == "cuda" else 8
            uvloop.run(run(cluster.url, dataclasses.replace(workload, num_requests=warm), progress=None))
            trace = args.trace if not args.trace or len(args.microbatches) == 1 else \
                args.trace.replace(".json", f".m={m}.json")
            cpu_before = cpu_seconds(cluster)
            report = uvloop.run(run(cluster.url, workload, trace_path=trace, progress=None))  # as bench serve
            cpu_s = {name: seconds - cpu_before.get(name, 0.0) for name, seconds in cpu_seconds(cluster).items()}
        rows.append({"microbatches": m, **dataclasses.asdict(report), "cpu_s": cpu_s})
        idle = ", ".join(f"{node} {value:.0%}" for node, value in sorted(report.idle_fraction.items()))
        busy = ", ".join(f"{node} {value:.0%} ({report.gpu_span_ms[node]:.3f} ms/span)"
                         for node, value in sorted(report.gpu_busy.items()))
        total = max(1.0, sum(report.tokens_per_node.values()))
        split = ", ".join(f"{node} {value / total:.0%}" for node, value in sorted(report.tokens_per_node.items()))
        print(f"m={m}: {report.output_tokens_per_s:8.1f} tok/s  TPOT p50 {report.tpot_ms['p50']:7.2f} p99 "
              f"{report.tpot_ms['p99']:7.2f} ms  TTFT p50 {report.ttft_ms['p50']:7.1f} ms"
              + (f" (mean {report.ttft_ms['mean']:.1f}: gateways {report.gateway_ttft_ms:.1f}, node queue "
                 f"{report.node_queue_ms or 0.0:.1f})" if report.gateway_ttft_ms is not None else "")
              + f"  failed {report.failed}  "
              f"host idle: {idle}" + (f"  GPU busy: {busy}" if busy else "")
              + f"  client CPU {report.client_cpu_s / max(report.duration_s, 1e-9) / report.client_processes:.0%}"
              + (f" per process ({report.client_processes})" if report.client_processes > 1 else "")
              + (f"  tokens per attention node: {split}" if len(report.tokens_per_node) > 1 else "")
              + "  eager steps: " + ", ".join(f"{node} {eager / max(1, steps):.0%} of {steps:.0f}"
                                             for node, (steps, eager) in sorted(report.steps_per_node.items())),
              flush=True)
        if args.json:  # after every row: a sweep cut short by a time limit keeps what it measured
            with open(args.json, "w") as handle:
                json.dump({"args": vars(args), "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
