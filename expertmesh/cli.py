"""The `expertmesh` command: launch a cluster, make a random model, and later tools.

Flags override the config file; the result is one `Config` handed to the command."""
from __future__ import annotations

import argparse
import sys

from .config import IPC_COPIES, Config, ModelConfig


def _launch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="start a whole cluster on this host (or across a Ray cluster: --ray)")
    p.add_argument("--config", help="YAML or JSON config file (sections: model, transport, engine, gateway, cluster)")
    p.add_argument("--model", help="Hugging Face checkpoint directory")
    p.add_argument("--attention-nodes", type=int)
    p.add_argument("--expert-nodes", type=int)
    p.add_argument("--host", help="address the gateway binds to (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gateway port (default 8000)")
    p.add_argument("--placement", help="placement JSON (default: contiguous blocks of experts)")
    p.add_argument("--topology", help="cluster description: domains of the nodes, link costs (see `place`)")
    p.add_argument("--predictor", help="domain predictor (.npz from `place`): rebatch requests by predicted domain")
    p.add_argument("--transport", choices=["auto", "ucx", "zmq", "nccl", "ipc", "gloo", "ucx-lockstep", "lockstep"],
                   help="data path between attention and expert nodes: lockstep rounds over nccl, ipc (CUDA IPC, one "
                        "host), gloo (CPU) or ucx-lockstep (UCX: CPU, or RDMA across hosts), lockstep (each link's "
                        "own: ipc or gloo within a host, nccl or ucx-lockstep across), or messages over ucx or zmq "
                        "(default auto: lockstep on GPUs; on CPU ucx where ucxx imports, else zmq)")
    p.add_argument("--ipc-copy", choices=IPC_COPIES,
                   help="ipc links: a send is the driver's copies (engine, the default) or one SM kernel (sm)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="cuda: each node on its own GPU")
    p.add_argument("--microbatches", type=int, help="ping-pong microbatches per step")
    p.add_argument("--emulated-latency-us", type=float, help="added one-way latency on attention->expert links")
    p.add_argument("--emulated-bandwidth-gbps", type=float, help="bandwidth cap on attention->expert links")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-batch-tokens", type=int, help="new tokens per step and M2N round (default 2048); longer "
                   "prompts prefill in chunks")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-waiting-steps", type=int, help="while sequences decode, steps new prompts may wait to "
                   "join together (default 0: at once)")
    p.add_argument("--block-size", type=int, help="tokens per KV-cache block (power of two, 8..256; default 16)")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="fraction of each attention GPU's memory for weights, activations and KV cache (default 0.9)")
    p.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks per attention node (overrides the sizing)")
    p.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs: run every step eagerly")
    p.add_argument("--prefill-graph-tokens", type=int, help="steps that carry prompt tokens replay CUDA graphs up to "
                   "this many new tokens (default: every step, up to --max-batch-tokens; 0: they run eagerly)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch each step while the previous one runs (its tokens stay on the device; "
                        "default: on for --device cuda, off on CPU)")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="model ids requests may name; the first is shown by /v1/models and reported (default: the "
                        "model directory's name, and --model as given)")
    p.add_argument("--recv-timeout", type=float,
                   help="seconds an expert node may take to answer a step's rounds before the step fails (default 30)")
    p.add_argument("--gateway-workers", type=int,
                   help="gateway processes sharing the HTTP port (default 1; one streams about 20k tokens/s at most)")
    p.add_argument("--stream-interval", type=int,
                   help="tokens a streamed chunk gathers before it is written; the first and last go at once "
                        "(default 1: every token; more: less gateway CPU per token, coarser streams)")
    p.add_argument("--max-pending-requests", type=int,
                   help="requests in flight past which /v1/* answers 429 with Retry-After (default 1024)")
    p.add_argument("--max-pending-tokens", type=int, help="prompt tokens in flight past which /v1/* answers 429")
    p.add_argument("--request-timeout", type=float, help="seconds from a request's arrival past which it is aborted "
                   "and answered 504 (default: none; a request's `timeout` field may shorten it)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* and /admin/* (/health and "
                   "/metrics stay open)")
    p.add_argument("--ray", metavar="ADDRESS", help="start the nodes on the Ray cluster at ADDRESS (its head's "
                   "host:port, or auto), one per bundle of a placement group; the gateway stays on this host")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for every node")
    for role in ("attention", "expert"):
        p.add_argument(f"--{role}-sm-percent", type=int, metavar="P", help=f"under CUDA MPS, the percentage of a GPU's "
                       f"SMs each {role} node may use (one GPU standing in for a weaker type per role)")


def config_from_args(args: argparse.Namespace) -> Config:
    config = Config.load(args.config) if args.config else Config()
    overrides = [("model", "path", args.model), ("cluster", "attention_nodes", args.attention_nodes),
                 ("cluster", "expert_nodes", args.expert_nodes), ("gateway", "host", args.host),
                 ("gateway", "port", args.port), ("cluster", "placement", args.placement),
                 ("transport", "backend", args.transport), ("engine", "microbatches", args.microbatches),
                 ("model", "dtype", args.dtype), ("model", "device", getattr(args, "device", None)),
                 ("engine", "max_num_seqs", args.max_num_seqs), ("engine", "max_model_len", args.max_model_len),
                 ("engine", "max_batch_tokens", getattr(args, "max_batch_tokens", None)),
                 ("engine", "max_waiting_steps", getattr(args, "max_waiting_steps", None)),
                 ("gateway", "served_model_names", args.served_model_name),
                 ("transport", "emulated_latency_us", getattr(args, "emulated_latency_us", None)),
                 ("cluster", "topology", getattr(args, "topology", None)),
                 ("gateway", "predictor", getattr(args, "predictor", None)),
                 ("gateway", "api_key", getattr(args, "api_key", None)),
                 ("gateway", "max_pending_requests", getattr(args, "max_pending_requests", None)),
                 ("transport", "recv_timeout_s", getattr(args, "recv_timeout", None)),
                 ("gateway", "max_pending_tokens", getattr(args, "max_pending_tokens", None)),
                 ("gateway", "request_timeout_s", getattr(args, "request_timeout", None)),
                 ("transport", "emulated_bandwidth_gbps", getattr(args, "emulated_bandwidth_gbps", None)),
                 ("engine", "block_size", getattr(args, "block_size", None)),
                 ("engine", "gpu_memory_utilization", getattr(args, "gpu_memory_utilization", None)),
                 ("engine", "num_kv_blocks", getattr(args, "num_kv_blocks", None)),
                 ("engine", "enforce_eager", getattr(args, "enforce_eager", None)),
                 ("engine", "prefill_graph_tokens", getattr(args, "prefill_graph_tokens", None)),
                 ("engine", "async_scheduling", getattr(args, "async_scheduling", None)),
                 ("transport", "ipc_copy", getattr(args, "ipc_copy", None)),
                 ("gateway", "workers", getattr(args, "gateway_workers", None)),
                 ("gateway", "stream_interval", getattr(args, "stream_interval", None)),
                 ("cluster", "ray_address", getattr(args, "ray", None)),
                 ("cluster", "attention_sm_percent", getattr(args, "attention_sm_percent", None)),
                 ("cluster", "expert_sm_percent", getattr(args, "expert_sm_percent", None))]
    for section, key, value in overrides:
        if value is not None:
            setattr(getattr(config, section), key, value)
    return config.validate()


def _make_model_parser(sub: argparse._SubParsersAction) -> None:
    from .model.make_model import RandomModelShape
    defaults = RandomModelShape()
    p = sub.add_parser("make-model", help="write a small random MoE checkpoint (Hugging Face format)")
    p.add_argument("--arch", choices=["mixtral", "qwen3_moe", "deepseek_v3"], default="mixtral")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "dense_intermediate_size", "num_experts", "top_k", "decoder_sparse_step",
                 "max_position_embeddings", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "num_expert_groups", "top_groups", "first_k_dense_replace", "num_shared_experts"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("routed_scaling_factor", "yarn_factor"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name),
                       help="DeepSeek-V3 only")
    p.add_argument("--no-norm-topk-prob", action="store_true", help="Qwen3-MoE: do not renormalise top-k weights")
    p.add_argument("--mlp-only-layers", default="", help="Qwen3-MoE: comma-separated dense layers, e.g. 1,3")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights on disk")


def _span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    s = bench.add_parser("serve", help="drive a running cluster over HTTP with a synthetic workload")
    s.add_argument("--url", default="http://127.0.0.1:8000")
    s.add_argument("--num-requests", type=int, default=64)
    s.add_argument("--input-len", type=_span, default=(16, 64), help="prompt tokens, LOW:HIGH uniform")
    s.add_argument("--output-len", type=_span, default=(16, 64), help="generated tokens, LOW:HIGH uniform")
    s.add_argument("--concurrency", type=int, default=16, help="requests in flight (closed loop)")
    s.add_argument("--rate", type=float, help="requests/s, Poisson arrivals (open loop; overrides concurrency)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--client-processes", type=int, default=1,
                   help="processes sending the requests, the jobs and the concurrency split among them (one tops "
                        "out near 50k streamed tokens/s)")
    s.add_argument("--trace", help="write the nodes' timeline here (Chrome trace JSON, open in Perfetto)")
    s.add_argument("--json", help="write the report here as JSON")
    t = bench.add_parser("transport", help="latency and bandwidth of the transports between processes (p2p, M2N, NCCL)")
    t.add_argument("--backends", help="comma-separated, of zmq,ucx,lockstep,lockstep-gloo,lockstep-nccl,lockstep-ipc,"
                   "lockstep-ucx (default: zmq,ucx on cpu, ucx on cuda); lockstep: M2N rows only, over gloo on cpu, on "
                   "cuda NCCL (a GPU per process) or else CUDA IPC; lockstep-<links>: over those links, p2p rows too")
    t.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    t.add_argument("--sizes", help="point-to-point message sizes (default 4K,64K,1M,16M,64M; cuda adds 256M)")
    t.add_argument("--iters", type=int, default=100, help="timed round trips of small messages (large get fewer)")
    t.add_argument("--m2n", default="2x2", help="senders x receivers, e.g. 2x2")
    t.add_argument("--tokens", default="1,16,64,256", help="tokens per M2N message")
    t.add_argument("--hidden", type=int, default=4096)
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    t.add_argument("--nccl", action="store_true", help="also NCCL send/recv and all_to_all_single (needs 2 GPUs)")
    t.add_argument("--ucx-progress-mode", choices=["thread", "polling"], default="thread",
                   help="who progresses UCX: a progress thread, or the event loop polling (a core busy per process)")
    t.add_argument("--no-raw-ucxx", dest="raw_ucxx", action="store_false",
                   help="leave out the raw ucxx point-to-point baseline (run whenever ucx is among the backends)")
    t.add_argument("--json", help="write every row here as JSON")
    g = bench.add_parser("gateway", help="the gateway's CPU per streamed token on this host (no model, no GPU): "
                         "what the planner sizes the gateway by")
    g.add_argument("--model", default=ModelConfig.path, help="a checkpoint directory (its tokenizer)")
    g.add_argument("--workers", type=int, default=4, help="gateway processes")
    g.add_argument("--requests", type=int, default=2048)
    g.add_argument("--tokens", type=int, default=96, help="output tokens per request")
    g.add_argument("--concurrency", type=int, default=256, help="requests in flight")
    g.add_argument("--step-ms", type=float, default=4.5,
                   help="the stand-in node's step: concurrency tokens each (4.5: an H200's short rows, 57k tok/s)")
    g.add_argument("--stream-interval", type=int, default=1, help="gateway.stream_interval: tokens a chunk")
    g.add_argument("--client-processes", type=int, default=1, help="processes of bench serve's client")
    g.add_argument("--repeats", type=int, default=2)
    g.add_argument("--profile", help="py-spy the first gateway process over the last run, raw, into this file")
    g.add_argument("--json", help="write the runs here (a calibration file's bench_gateway entry reads it)")
    lay = bench.add_parser("layer", help="one MoE layer's attention and expert parts at decode, against the floor")
    lay.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    lay.add_argument("--shapes", help="comma-separated of mixtral,qwen3,deepseek_v3,tiny,tiny_mla or checkpoint "
                     "directories (default: mixtral,qwen3; tiny on cpu)")
    lay.add_argument("--parts", default="attention,experts", help="which parts to time (experts stacks them all)")
    lay.add_argument("--tokens", default="1,16,64,256", help="decode tokens (= sequences)")
    lay.add_argument("--contexts", default="512,4096", help="tokens of context per sequence")
    lay.add_argument("--prefill-tokens", default="", help="prefill chunk sizes in tokens to time too, eagerly "
                     "(e.g. 256,1024,4096; default none)")
    lay.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt in a prefill chunk")
    lay.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    lay.add_argument("--moe-backends", default="grouped_mm,triton", help="fused-MoE backends to time (also: reference)")
    lay.add_argument("--reps", type=int, default=50)
    lay.add_argument("--json", help="write every row here as JSON")


def _profile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="record every token's routing over a text (a routing trace, .npz)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="JSONL of {text, domain?, doc_id?}, or a plain text file")
    p.add_argument("--out", required=True, help="trace file (.npz; format in expertmesh/placement/trace.py)")
    p.add_argument("--window", type=int, default=256, help="tokens per forward window")
    p.add_argument("--max-tokens", type=int, help="stop after about this many tokens")
    p.add_argument("--plot", action="store_true", help="also draw domain x expert heatmaps to OUT.png")
    p.add_argument("--report", help="write the routing statistics here as JSON")


def _place_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("place", help="co-activation placement of experts over expert nodes and domains")
    p.add_argument("--trace", required=True, help="routing trace to fit on (.npz from `profile`)")
    p.add_argument("--cluster", required=True, help="YAML/JSON topology: domains, attention_nodes, expert_nodes, "
                   "slots_per_node, link costs, load bounds (expertmesh/placement/topology.py)")
    p.add_argument("--out", required=True, help="placement JSON (the cluster's --placement)")
    p.add_argument("--replicate", action="store_true", help="fill free slots with replicas of hot experts")
    p.add_argument("--predictor-out", help="also fit the gateway's domain predictor on the trace, write it here (.npz)")
    p.add_argument("--tokens-per-request", type=int, default=256, help="span of a document counted as one request")
    p.add_argument("--seed", type=int, default=0)


def _simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="replay a routing trace on a cluster of any size, report bytes and load")
    p.add_argument("--trace", help="routing trace to replay (.npz; default with --shape: a synthetic one)")
    p.add_argument("--shape", help="a released model's shape (mixtral, qwen3, deepseek_v3): its hidden size, and "
                   "without --trace a synthetic trace of its routing (documents of 256 tokens in 4 text domains)")
    p.add_argument("--synthetic-docs", type=int, default=64, help="documents of the synthetic trace")
    p.add_argument("--cluster", required=True, help="YAML/JSON topology (as for `place`)")
    p.add_argument("--placement", help="placement JSON (default: contiguous blocks)")
    p.add_argument("--policy", choices=["round_robin", "rebatch"], default="round_robin",
                   help="requests to attention nodes: in turn, or by predicted domain within the load bound")
    p.add_argument("--predictor", help="rebatch: predictor .npz from `place` (default: fit one on --fit-trace)")
    p.add_argument("--fit-trace", help="rebatch without --predictor: trace to fit the predictor on (default --trace)")
    p.add_argument("--hidden-size", type=int, help="activation width (default: the trace's model config)")
    p.add_argument("--dtype-bytes", type=int, default=2)
    p.add_argument("--tokens-per-request", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=64, help="first tokens of a request: the prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spill", action="store_true",
                   help="replica choice spills to remote copies when the local ones exceed the load bound")
    p.add_argument("--json", help="write the report here as JSON")


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="search deployments of the GPUs on offer under a TPOT objective")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="Hugging Face checkpoint directory (its config.json)")
    what.add_argument("--shape", help="a released model's shape: mixtral, mixtral_8x22b, qwen3, qwen3_235b, deepseek_v3")
    p.add_argument("--gpu-offer", default="", help="GPU types and counts on offer, e.g. H200:8,H20:16 (built in: "
                   "H100, H200, H20, L40S, A100; default: the counts in --gpus FILE)")
    p.add_argument("--gpus", help="YAML/JSON `gpus:` list overriding or adding GPU types (name, hbm_gib, hbm_tb_s, "
                   "bf16_tflops, intra_host_gb_s, inter_host_gb_s, count, price_per_hour, device_names)")
    p.add_argument("--price", action="append", default=[], metavar="NAME=USD",
                   help="price per GPU-hour of a type (repeatable); with a price for every type, plans rank per cost")
    p.add_argument("--tpot-p99-ms", type=float, required=True, help="latency objective: time per output token, p99")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--calibration", help="calibration file (expertmesh/planner/calibration.py; default: our H200 runs)")
    p.add_argument("--routing", help="a `simulate --json` report of the model's routing trace: its expert load "
                   "imbalance (busiest expert node over the mean) slows every plan's experts (default: uniform)")
    p.add_argument("--gpus-per-host", type=int, default=8)
    p.add_argument("--top", type=int, default=5, help="plans to show")
    p.add_argument("--out", help="write the best plan's cluster config here (YAML or JSON), for `launch --config`")
    p.add_argument("--model-path", help="with --shape and --out: the checkpoint directory the config names")


def _plan(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .model.shapes import shape as named_shape
    from .model.spec import ModelSpec
    from .planner import calibration
    from .planner.gpus import load_gpus, parse_offer
    from .planner.search import NoFeasiblePlan, Objective, config_dict, format_plans, search, to_config
    try:
        spec = ModelSpec.from_dir(args.model) if args.model else named_shape(args.shape)[1]
        prices = {}
        for item in args.price:
            name, _, value = item.partition("=")
            try:
                prices[name] = float(value)
            except ValueError:
                raise ConfigError(f"--price {item!r}: write NAME=USD, e.g. H200=3.5") from None
        gpus = load_gpus(parse_offer(args.gpu_offer), args.gpus, prices)
        cal = calibration.load(args.calibration) if args.calibration else calibration.H200
        objective = Objective(args.tpot_p99_ms, args.prompt_len, args.output_len)
        imbalance = 1.0
        if args.routing:
            import json
            with open(args.routing) as handle:
                imbalance = float(json.load(handle)["expert_load_max_over_mean"])
        plans = search(spec, gpus, objective, cal, args.top, args.gpus_per_host, expert_load_imbalance=imbalance)
    except (ConfigError, NoFeasiblePlan, ValueError, FileNotFoundError) as exc:
        print(f"expertmesh plan: {exc}", file=sys.stderr)
        return 2
    print(format_plans(plans))
    if args.out:
        config = to_config(plans[0], args.model or args.model_path or f"<checkpoint of {args.shape}>",
                           args.gpus_per_host, args.prompt_len)
        import json
        with open(args.out, "w") as handle:
            if args.out.endswith((".yaml", ".yml")):
                import yaml
                yaml.safe_dump(config_dict(config), handle, sort_keys=False)
            else:
                json.dump(config_dict(config), handle, indent=2)
        print(f"config of plan #1: {args.out} (expertmesh launch --config {args.out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expertmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _launch_parser(sub)
    _make_model_parser(sub)
    _bench_parser(sub)
    _profile_parser(sub)
    _place_parser(sub)
    _simulate_parser(sub)
    _plan_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    if args.command == "place":
        from .placement.partition import place_files
        print(place_files(args.trace, args.cluster, args.out, args.replicate, args.predictor_out,
                          args.tokens_per_request, args.seed))
        return 0
    if args.command == "simulate":
        import json
        from .placement.simulator import simulate_files
        report = simulate_files(args.trace, args.cluster, args.placement, args.policy, args.predictor, args.fit_trace,
                                args.hidden_size, args.dtype_bytes, args.tokens_per_request, args.prompt_tokens,
                                args.seed, args.spill, args.shape, args.synthetic_docs)
        print(json.dumps(report.to_dict(), indent=1))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report.to_dict(), handle, indent=1)
        return 0
    if args.command == "profile":
        import json
        from .attention_node.profile import profile
        from .placement.routing_stats import format_report, plot_heatmaps, report
        trace = profile(args.model, args.data, args.out, window=args.window, max_tokens=args.max_tokens)
        stats = report(trace)
        print(format_report(stats))
        if args.report:
            with open(args.report, "w") as handle:
                json.dump(stats, handle, indent=1)
        if args.plot:
            png = str(args.out).removesuffix(".npz") + ".png"
            plot_heatmaps(trace, png)
            print(f"heatmaps: {png}")
        return 0
    if args.command == "bench" and args.bench == "serve":
        from .bench.serve import Workload, main as bench_serve
        workload = Workload(args.num_requests, args.input_len, args.output_len, args.concurrency, args.rate, args.seed,
                            client_processes=args.client_processes)
        try:
            workload.check()
        except ValueError as exc:
            parser.error(f"--client-processes: {exc}")
        return bench_serve(args.url, workload, args.trace, args.json)
    if args.command == "bench" and args.bench == "gateway":
        from .bench.gateway import main as bench_gateway
        return bench_gateway(args)
    if args.command == "bench" and args.bench == "layer":
        from .bench.layer import main as bench_layer
        return bench_layer(args)
    if args.command == "bench" and args.bench == "transport":
        from .bench.transport import main as bench_transport
        return bench_transport(args)
    if args.command == "launch":
        config = config_from_args(args)
        if config.cluster.ray_address:
            from .launcher.ray_cluster import launch as launch_on_ray
            return launch_on_ray(config, args.ready_timeout)
        from .launcher.local import launch
        return launch(config, args.ready_timeout)
    if args.command == "make-model":
        from .model.make_model import RandomModelShape, make_model
        sizes = {k: v for k, v in vars(args).items()
                 if k in RandomModelShape.__dataclass_fields__ and k not in ("mlp_only_layers", "norm_topk_prob")}
        import torch
        layers = [int(x) for x in args.mlp_only_layers.split(",") if x.strip()]
        shape = RandomModelShape(**sizes, norm_topk_prob=not args.no_norm_topk_prob, mlp_only_layers=layers)
        print(make_model(args.out, shape, args.seed, getattr(torch, args.dtype)))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
