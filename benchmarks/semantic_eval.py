"""Semantic placement and rebatching against baselines on held-out mixed-domain text (issue 5): cross-domain bytes per
generated token, fan-out and load, placements and predictor fitted on one trace and replayed on another.

Traces (the default model on the validation and test splits):
  python -m expertmesh profile --model models/expertmesh-mini --data data/corpus/validation.jsonl \\
      --out /tmp/val_trace_full.npz
  python -m expertmesh profile --model models/expertmesh-mini --data data/corpus/test.jsonl --out /tmp/test_trace.npz
then: python benchmarks/semantic_eval.py --fit-trace /tmp/val_trace_full.npz --eval-trace /tmp/test_trace.npz
--halves: fit on the odd documents of the eval trace, replay the even ones (held-out documents, same domain mix)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from expertmesh.placement.simulator import CostModel, compare_strategies
from expertmesh.placement.topology import Topology
from expertmesh.placement.trace import RoutingTrace

# (domains, attention nodes, expert nodes, slots per expert node per layer); 16 experts per layer in the default
# model, so 8 expert nodes hold 2 each (+1 slot = 50% more expert memory), 16 hold 1 each (+1 = 100% more).
CLUSTERS = [(2, 8, 8, 3), (4, 8, 8, 3), (8, 8, 8, 3), (2, 16, 16, 2), (4, 16, 16, 2), (8, 16, 16, 2)]


def documents(trace: RoutingTrace, parity: int) -> RoutingTrace:
    """The tokens of the documents whose index has this parity (0 even, 1 odd)."""
    keep = trace.doc_index % 2 == parity
    return RoutingTrace(trace.token_ids[keep], trace.doc_index[keep], trace.domain_index[keep], trace.expert_ids[keep],
                        trace.expert_weights[keep], trace.moe_layers, trace.doc_ids, trace.domains, trace.num_experts,
                        trace.model)


def table(rows: list[dict]) -> str:
    lines = ["| domains | expert nodes | placement | requests | copies/layer | cross-domain B/token | vs baseline | "
             "fan-out | expert load max/mean (held-out) | (fit) | attention load | predictor acc | step us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        accuracy = f"{r['predictor_accuracy']:.2f}" if "predictor_accuracy" in r else "-"
        policy = r["policy"] + ("+spill" if r["spill"] else "")
        lines.append(f"| {r['domains']} | {r['expert_nodes']} | {r['placement']} | {policy} | "
                     f"{r['copies_per_layer']} | {r['cross_domain_bytes_per_token']:.0f} | {-r['reduction']:+.0%} | "
                     f"{r['fanout']:.2f} | {r['expert_load_max_over_mean']:.2f} | "
                     f"{r['fit_expert_load_max_over_mean']:.2f} | {r['attention_load_max_over_mean']:.2f} | "
                     f"{accuracy} | {r['step_time_us']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit-trace", default="/tmp/val_trace_full.npz", help="trace placements are fitted on")
    parser.add_argument("--eval-trace", default="/tmp/test_trace.npz", help="held-out trace replayed")
    parser.add_argument("--clusters", default=",".join(":".join(map(str, c)) for c in CLUSTERS),
                        help="comma-separated DOMAINS:ATTENTION:EXPERT:SLOTS")
    parser.add_argument("--tokens-per-request", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--load-bound", type=float, default=1.1,
                        help="expert-node load bound (max/mean) that placement and the spill rule keep to")
    parser.add_argument("--halves", action="store_true", help="fit on odd documents of --eval-trace, replay even ones")
    parser.add_argument("--json", default="benchmarks/semantic_eval.json")
    args = parser.parse_args()
    for path in (args.fit_trace, args.eval_trace):
        if not Path(path).is_file():
            print(f"trace {path!r} missing; make it with `expertmesh profile` (see this script's docstring)",
                  file=sys.stderr)
            return 1
    fit, held_out = RoutingTrace.load(args.fit_trace), RoutingTrace.load(args.eval_trace)
    if args.halves:
        fit, held_out = documents(held_out, 1), documents(held_out, 0)
    hidden = json.loads((Path(held_out.model) / "config.json").read_text())["hidden_size"]
    cost = CostModel(hidden_size=hidden, dtype_bytes=2)
    rows = []
    for spec in args.clusters.split(","):
        domains, attention, experts, slots = map(int, spec.split(":"))
        topology = Topology.uniform(domains, attention, experts, slots_per_node=slots, load_bound=args.load_bound)
        start = time.time()
        cluster_rows = compare_strategies(fit, held_out, topology, cost, args.tokens_per_request, args.prompt_tokens)
        rows += cluster_rows
        print(table(cluster_rows), f"\n({time.time() - start:.0f} s)\n", flush=True)
    print(table(rows))
    Path(args.json).write_text(json.dumps({"fit_trace": args.fit_trace, "eval_trace": args.eval_trace,
                                           "halves": args.halves, "load_bound": args.load_bound,
                                           "fit_tokens": fit.num_tokens, "eval_tokens": held_out.num_tokens,
                                           "cost_model": vars(cost), "rows": rows}, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
