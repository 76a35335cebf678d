"""The planner's performance model against served runs: for every measured `microbatch_sweep.py` row (JSON), the
same seeded workload replayed through perf.closed_loop with that row's cluster, beside the measured tok/s and TPOT.

    python benchmarks/plan_validation.py            # prints the markdown table of benchmarks/RESULTS.md
    python benchmarks/plan_validation.py --gpu-rows # the 2 x H200 rows (benchmarks/gpu_multi/serve), no GPU needed
    python benchmarks/plan_validation.py --gpu-rows --host-per-sequence-us 0   # GPU host time per step constant
    python benchmarks/plan_validation.py --eager-cost   # one-GPU rows: steps with prompts at their traced host time
    python benchmarks/plan_validation.py --gpu-rows --own-gateway-cpu   # each row's own gateway CPU per token
    python benchmarks/plan_validation.py --gpu-rows --no-host-latency   # no host path latency (before session 16)

Calibrations: GPU rows use the shipped H200 parts (bench layer) with the one-GPU lockstep round (both nodes shared
one H200 under MPS); CPU rows use `bench layer --device cpu` and `bench transport` (zmq) from this machine. Each
device's step overhead (host work per step outside the layers) is fitted to its colocated row's TPOT p50, the
only figure taken from a served run; every other row is a prediction. The paired CPU rows (plan_validation_cpu.sh)
fit nothing: each row's own bench layer and bench transport and, in planner/served*, a traced 1x1 run of its model
(planner/served.py: the served round, the disaggregated parts' served time, the host work per step; in
planner/prefill* also bench layer's eager prefill lines, and the host work per step as a line in the sequences from
traced runs at 4, 16 and 32, which give the parts' served factors at each of those sizes too). The GPU rows' served terms add the gateway's CPU per output token: the seventeenth
session's one-client rows' (GATEWAY_ROWS), or the row's own device call's `expertmesh bench gateway` run where it has one
(host_probe); and the host path's latency per request, client to node and back (host_latency_us, fitted to the same
rows' TTFT), which a closed loop's slots wait empty between requests."""
from __future__ import annotations

import dataclasses
import json
import random
import statistics
import sys
from pathlib import Path

from expertmesh.config import EngineConfig
from expertmesh.model.spec import ModelSpec
from expertmesh.planner import calibration, served
from expertmesh.planner.gpus import BUILTIN, GpuType
from expertmesh.planner.perf import Deployment, closed_loop

HERE = Path(__file__).resolve().parent
CPU_CORES = 1  # cores the nodes effectively had: 2 cores, load average 5-9 from other work during these runs
# planner/served: the idle machine's 2 cores; the gateway and the bench client took 0.15 of a core beside them
# (/proc CPU time over a served mini 1x1 run, RESULTS.md)
SERVED_CPU_CORES = 2
PAIRED = {"planner/paired": CPU_CORES, "planner/served": SERVED_CPU_CORES,  # plan_validation_cpu.sh's runs
          "planner/served_2": SERVED_CPU_CORES, "planner/prefill": SERVED_CPU_CORES,
          "planner/prefill_2": SERVED_CPU_CORES, "planner/prefill_3": SERVED_CPU_CORES,
          "planner/session12": SERVED_CPU_CORES, "planner/session12_2": SERVED_CPU_CORES,
          "planner/session12_3": SERVED_CPU_CORES, "planner/session12_4": SERVED_CPU_CORES,
          "planner/session15": SERVED_CPU_CORES, "planner/session17": SERVED_CPU_CORES}

QWEN3_8_LAYERS = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048, num_hidden_layers=8,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                      moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                      max_position_embeddings=1024)  # benchmarks/gpu_lockstep.sh's qwen3 (random weights)
MBIG = dict(architectures=["MixtralForCausalLM"], vocab_size=2048, hidden_size=512, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, intermediate_size=1024, num_local_experts=8,
            num_experts_per_tok=2)  # make-model --hidden-size 512 --num-layers 4 ... (RESULTS.md, CPU section)


def row_of(run: dict, index: int | str) -> dict:
    """Row `index` of a sweep's JSON; "m=N": the median of its rows at N microbatches (MICROBATCHES="1 1 1" in
    gpu_lockstep.sh serves the same configuration three times, each on a cluster of its own): the same
    configuration served minutes apart varied by up to 29% on one H200 (RESULTS.md, eighth session)."""
    if isinstance(index, int):
        return run["rows"][index]
    rows = [row for row in run["rows"] if row["microbatches"] == int(index.removeprefix("m="))]
    median = dict(rows[0])
    median["output_tokens_per_s"] = statistics.median(row["output_tokens_per_s"] for row in rows)
    for key in ("tpot_ms", "ttft_ms"):
        median[key] = {**rows[0][key], "p50": statistics.median(row[key]["p50"] for row in rows)}
    return median


def jobs_of(args: dict) -> list[tuple[int, int]]:
    """bench serve's seeded requests (expertmesh/bench/serve.py draws them in this order)."""
    rng = random.Random(0)
    return [(len([rng.randrange(10, 256) for _ in range(rng.randint(*args["input_len"]))]),
             rng.randint(*args["output_len"])) for _ in range(args["num_requests"])]


def spec_of(model: str) -> ModelSpec:
    if model == "/tmp/qwen3":
        return ModelSpec.from_hf_config(QWEN3_8_LAYERS)
    if model == "/tmp/qwen3_p8192":  # gpu_lockstep.sh MAX_POS=8192: the same model with room for long contexts
        return ModelSpec.from_hf_config({**QWEN3_8_LAYERS, "max_position_embeddings": 8192})
    if model == "/tmp/mbig":
        return ModelSpec.from_hf_config(MBIG)
    return ModelSpec.from_dir(HERE.parent / model)


def cpu_setup(layer: Path = HERE / "planner/cpu_bench_layer.json",
              transport: Path = HERE / "planner/cpu_bench_transport.json") -> tuple[calibration.Calibration, GpuType]:
    cal = calibration.from_benchmarks("cpu", str(layer), str(transport), "reference", "zmq")
    cpu = GpuType("cpu", 64, cal.copy_bytes_per_s / 1e12, cal.matmul_flops_per_s / 1e12, 0, 0)
    return cal, cpu


def gpu_setup() -> tuple[calibration.Calibration, GpuType]:
    """The shipped H200 calibration with the one-GPU lockstep round and, with `--eager-cost`, the host time per
    layer of the steps that carry prompts (eager), from the eighth session's traced one-GPU run."""
    one_gpu_round = calibration.fit_round(json.loads((HERE / "gpu_lockstep/graphs/bench_transport.json").read_text()),
                                          "lockstep-ipc")
    trace = json.loads((HERE / "gpu_multi/session8/one_gpu/run2/serve_qwen3_c64_disagg_ipc.trace.json").read_text())
    eager = served.eager_layer_us(trace, 8) if "--eager-cost" in sys.argv[1:] else 0.0
    return dataclasses.replace(calibration.H200, round=one_gpu_round, round_link_bytes_per_s=None,
                               eager_layer_us=eager), BUILTIN["H200"]


# (label, JSON, row index in it, device): CPU rows measured in this session (2 cores shared with other work),
# GPU rows from benchmarks/gpu_lockstep/{precapture,graphs} (one H200, Qwen3-30B-A3B shape with 8 layers)
ROWS = [
    ("CPU mini colocated m=1", "planner/cpu_mini_colocated{}.json", 0, "cpu"),
    ("CPU mini 1+1 m=1", "planner/cpu_mini_1x1{}.json", 0, "cpu"),
    ("CPU mini 1+1 m=2", "planner/cpu_mini_1x1{}.json", 1, "cpu"),
    ("CPU mini 1+2 m=1", "planner/cpu_mini_1x2{}.json", 0, "cpu"),
    ("CPU mini 2+2 m=1", "planner/cpu_mini_2x2{}.json", 0, "cpu"),
    ("CPU mbig colocated m=1", "planner/cpu_mbig_colocated{}.json", 0, "cpu"),
    ("CPU mbig 1+1 m=1", "planner/cpu_mbig_1x1{}.json", 0, "cpu"),
    ("CPU mbig 1+1 m=2", "planner/cpu_mbig_1x1{}.json", 1, "cpu"),
    ("H200 colocated m=1 (precapture run)", "gpu_lockstep/precapture/serve_qwen3_c64_colocated.json", 0, "gpu"),
    ("H200 1+1 ipc m=1 (precapture run)", "gpu_lockstep/precapture/serve_qwen3_c64_disagg.json", 1, "gpu"),
    ("H200 1+1 ipc m=2 (precapture run)", "gpu_lockstep/precapture/serve_qwen3_c64_disagg.json", 2, "gpu"),
    ("H200 colocated m=1 (graphs run)", "gpu_lockstep/graphs/serve_qwen3_c64_colocated.json", 0, "gpu"),
    ("H200 1+1 ipc m=1 (graphs run)", "gpu_lockstep/graphs/serve_qwen3_c64_disagg.json", 1, "gpu"),
    ("H200 1+1 ipc m=2 (graphs run)", "gpu_lockstep/graphs/serve_qwen3_c64_disagg.json", 2, "gpu"),
    # the seventh session's, fused kernels and lockstep graphs as now, 4 gateway processes, sync scheduling
    ("H200 1+1 ipc m=1 (session 7)", "gpu_multi/session7/one_gpu/serve_qwen3_c64_disagg_ipc.json", 0, "gpu"),
    ("H200 1+1 ipc m=2 (session 7)", "gpu_multi/session7/one_gpu/serve_qwen3_c64_disagg_ipc.json", 1, "gpu"),
    ("H200 colocated m=1 (session 7)", "gpu_multi/session7/one_gpu/serve_qwen3_c64_colocated.json", 0, "gpu"),
    ("H200 Mixtral 1+1 ipc m=1 (session 7)", "gpu_multi/session7/one_gpu/serve_mixtral_c64_disagg_ipc.json", 0, "gpu"),
    ("H200 Mixtral 1+1 ipc m=2 (session 7)", "gpu_multi/session7/one_gpu/serve_mixtral_c64_disagg_ipc.json", 1, "gpu"),
    ("H200 Mixtral colocated m=1 (session 7)", "gpu_multi/session7/one_gpu/serve_mixtral_c64_colocated.json", 0, "gpu"),
    # the eighth session's: bench serve's own client, async scheduling; "70/30": the attention node on 70% of the
    # SMs and the expert node on 30% (CUDA MPS), planned as two GPU types (share_type)
    ("H200 colocated m=1 (session 8, run 1)", "gpu_multi/session8/one_gpu/run1/serve_qwen3_c64_colocated.json", 0,
     "gpu"),
    ("H200 colocated m=1 (session 8, run 5)", "gpu_multi/session8/one_gpu/run5/serve_qwen3_c64_colocated.json", 0,
     "gpu"),
    ("H200 1+1 ipc m=1 (session 8, run 5)", "gpu_multi/session8/one_gpu/run5/serve_qwen3_c64_disagg_ipc.json", 0,
     "gpu"),
    ("H200 1+1 ipc m=1 70/30 (session 8, run 2)",
     "gpu_multi/session8/one_gpu/run2/serve_qwen3_c64_disagg_ipc_sm70_30.json", 0, "gpu"),
    ("H200 1+1 ipc m=1 70/30 (session 8, run 3)",
     "gpu_multi/session8/one_gpu/run3/serve_qwen3_c64_disagg_ipc_sm70_30.json", 0, "gpu"),
    ("H200 1+1 ipc m=1 70/30 (session 8, run 4)",
     "gpu_multi/session8/one_gpu/run4/serve_qwen3_c64_disagg_ipc_sm70_30.json", 0, "gpu"),
]
# bench layer of the Qwen3 shape under each share, in the same device session as the 70/30 rows
SHARE_LAYERS = HERE / "gpu_multi/session8/one_gpu/run2"


def share_type(gpu: GpuType, cal: calibration.Calibration, percent: int, layers: Path = SHARE_LAYERS) -> GpuType:
    """The GPU type `percent`% of gpu's SMs stands for (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE): its memory bandwidth
    and bf16 rate scaled by what bench layer measured under that share (layer_qwen3_sm<percent>.json in `layers`)
    against the full GPU's (cal's)."""
    layer = json.loads((layers / f"layer_qwen3_sm{percent}.json").read_text())
    return dataclasses.replace(gpu, name=f"{gpu.name} at {percent}% of its SMs",
                               hbm_tb_s=gpu.hbm_tb_s * layer["copy_bytes_per_s"] / cal.copy_bytes_per_s,
                               bf16_tflops=gpu.bf16_tflops * layer["matmul_flops_per_s"] / cal.matmul_flops_per_s)
REPEATS = ("", "_2")  # CPU rows ran twice, minutes apart: first and second measurement


def scaled(cal: calibration.Calibration, factor: float) -> calibration.Calibration:
    """Every host cost of the calibration times `factor`."""
    def times(line: calibration.Linear) -> calibration.Linear:
        return calibration.Linear(line.overhead_us * factor, line.slope * factor, line.per_token_us * factor)
    return dataclasses.replace(cal, attention=times(cal.attention), experts=times(cal.experts), round=times(cal.round))


def predict_row(run: dict, row: dict, cal: calibration.Calibration, device: GpuType, kind: str,
                cores: int = CPU_CORES) -> dict:
    args = run["args"]
    expert_nodes = args["expert_nodes"]
    attention_gpu, expert_gpu = (share_type(device, cal, p) for p in args["sm_percent"]) if args.get("sm_percent") \
        else (device, device)
    plan = Deployment(attention_gpu, None if expert_nodes == 0 else expert_gpu, args["attention_nodes"], expert_nodes,
                      row["microbatches"], args["max_num_seqs"], 0, shared_devices=1 if kind == "gpu" else cores,
                      dtype_bytes=2 if args.get("dtype") == "bfloat16" else 4,
                      async_scheduling=bool(args.get("async_scheduling")))
    return closed_loop(gpu_spec_of(args["model"]), plan, cal, jobs_of(args), in_flight(args, row),
                       max_waiting_steps=args.get("max_waiting_steps", 0), prefill_graph_tokens=prefill_graphs(args))


def prefill_graphs(args: dict) -> int:
    """The run's engine.prefill_graph_tokens: 0 for sweeps from before steps with prompts had graphs (no such
    argument), the engine's default where the sweep left it unset."""
    if "prefill_graph_tokens" not in args:
        return 0
    engine = EngineConfig(prefill_graph_tokens=args["prefill_graph_tokens"])
    engine.max_batch_tokens = args.get("max_batch_tokens") or engine.max_batch_tokens
    return engine.graph_prefill_limit()


def rows() -> list[tuple[str, Path, int, str]]:
    """(label, JSON, row index, device) of every measured row there is."""
    found = []
    for label, path, index, kind in ROWS:
        for repeat in (REPEATS if "{}" in path else ("",)):
            file = HERE / path.format(repeat)
            if file.exists():
                found.append((label + (f" (run {REPEATS.index(repeat) + 1})" if "{}" in path else ""), file, index,
                              kind))
    return found


def main() -> int:
    setups = {"cpu": cpu_setup(), "gpu": gpu_setup()}
    measured = rows()
    # each device's one fitted figure, from its first colocated row: on the GPU the step overhead (host work per
    # step outside the layers), on the CPU the share of its cores the served processes got against the bench runs'
    for kind, (cal, device) in list(setups.items()):
        label, path, index, _ = next(r for r in measured if r[3] == kind)
        run = json.loads(path.read_text())
        predicted = predict_row(run, row_of(run, index), cal, device, kind)
        measured_tpot = row_of(run, index)["tpot_ms"]["p50"]
        if kind == "gpu":
            overhead_us = (measured_tpot - predicted["tpot_ms_p50"]) * 1e3
            setups[kind] = (dataclasses.replace(cal, step_overhead_us=max(0.0, overhead_us)), device)
            print(f"{kind}: step overhead {overhead_us:.0f} us, fitted to {label}", file=sys.stderr)
        else:
            share = measured_tpot / predicted["tpot_ms_p50"]
            setups[kind] = (scaled(cal, share), device)
            print(f"{kind}: CPU time x {share:.3f}, fitted to {label}", file=sys.stderr)
    print("| configuration | measured tok/s | predicted tok/s | error | measured TPOT p50 ms | predicted | error | "
          "TTFT p50 ms measured / predicted |")
    print("|---|---|---|---|---|---|---|---|")
    for label, path, index, kind in measured:
        run = json.loads(path.read_text())
        row = row_of(run, index)
        predicted = predict_row(run, row, *setups[kind], kind)
        tok, tpot = row["output_tokens_per_s"], row["tpot_ms"]["p50"]
        print(f"| {label} | {tok:.0f} | {predicted['tokens_per_s']:.0f} | "
              f"{predicted['tokens_per_s'] / tok - 1:+.0%} | {tpot:.2f} | {predicted['tpot_ms_p50']:.2f} | "
              f"{predicted['tpot_ms_p50'] / tpot - 1:+.0%} | {row['ttft_ms']['p50']:.0f} / "
              f"{predicted['ttft_ms_p50']:.0f} |")
    current = []
    for folder, cores in PAIRED.items():
        rows_of = paired_table(folder, cores)
        if folder in CURRENT_CPU_RUNS:
            current += rows_of
    within = [1 for _, tok, predicted in current if abs(predicted / tok - 1) <= 0.15]
    errors = {label: error for label, (error, _) in by_configuration(
        [(label, label, tok, predicted) for label, tok, predicted in current]).items()}
    print(f"\nCPU rows of the current code ({', '.join(CURRENT_CPU_RUNS)}): {len(within)} of {len(current)} within "
          f"15% on tok/s; per configuration (the median of its runs): "
          f"{sum(abs(e) <= 0.15 for e in errors.values())} of {len(errors)}; beyond it: " + (
              "; ".join(f"{label} {e:+.0%}" for label, e in errors.items() if abs(e) > 0.15) or "none"))
    return 0


# the CPU runs since bench layer's CPU rows were corrected (twelfth session): each a paired run of every row
CURRENT_CPU_RUNS = ("planner/session12_3", "planner/session12_4", "planner/session15", "planner/session17")


SERVED_CALIBRATION = dict(tokens=16, context=32 + 32 / 2)  # plan_validation_cpu.sh's traced run: 16 x (32 in, 32 out)


def paired_cpu_setup(path: Path) -> tuple[calibration.Calibration, GpuType]:
    """The row's own calibration: bench layer and bench transport, then (where it was traced) the served round, the
    parts' served time and the host work per step from a 1x1 run of the row's model (planner/served.py)."""
    cal, cpu = cpu_setup(path.with_name(path.stem + "_layer.json"), path.with_name(path.stem + "_transport.json"))
    trace = path.with_name(path.stem + "_served.trace.json")
    if trace.exists():
        run = json.loads(path.read_text())
        cpu_s = json.loads(path.with_name(path.stem + "_served.json").read_text())["rows"][0].get("cpu_s")
        phases = served.phases_of(json.loads(trace.read_text()), cpu_s)
        # the same traced run at other batch sizes (plan_validation_cpu.sh's HOST_CONCURRENCIES), where there are
        others = {int(t.name.split("_served_c")[1].split(".")[0]): served.phases_of(json.loads(t.read_text()))
                  for t in path.parent.glob(path.stem + "_served_c*.trace.json")}
        cal = served.served_calibration(cal, phases, spec_of(run["args"]["model"]), cpu, dtype_bytes=4,
                                        other_batches=others, **SERVED_CALIBRATION)
        if others:
            hosts = ", ".join(f"{n}: {p.step_host_us / 1e3:.2f}" for n, p in sorted({**others, 16: phases}.items()))
            print(f"{path.stem}: host ms per step at (sequences: ms) {hosts} -> {cal.step_overhead_us / 1e3:.2f} ms "
                  f"+ {cal.step_overhead_per_sequence_us:.0f} us per sequence", file=sys.stderr)
    return cal, cpu


def paired_table(folder: str, cores: int) -> list[tuple[str, float, float]]:
    """CPU rows served right after their own calibration (benchmarks/plan_validation_cpu.sh): nothing fitted.
    Returns (configuration, measured tok/s, predicted) per row."""
    paired = sorted((HERE / folder).glob("*.json"))
    runs = [path for path in paired if not path.stem.endswith(("_layer", "_transport", ".trace"))
            and "_served" not in path.stem]
    if not runs:
        return []
    found = []
    print(f"\n{folder}:\n\n| configuration (calibrated just before) | load average before / after | measured tok/s "
          "| predicted tok/s | error | measured TPOT p50 ms | predicted | error | TTFT p50 ms measured / predicted | "
          "prefill share (model) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in runs:
        setup = paired_cpu_setup(path)
        load = [line.split()[0] for line in path.with_suffix(".load").read_text().splitlines()]
        run = json.loads(path.read_text())
        for row in run["rows"]:
            predicted = predict_row(run, row, *setup, "cpu", cores)
            tok, tpot = row["output_tokens_per_s"], row["tpot_ms"]["p50"]
            print(f"| CPU {path.stem.replace('_', ' ')} m={row['microbatches']} | {' / '.join(load)} | {tok:.0f} | "
                  f"{predicted['tokens_per_s']:.0f} | {predicted['tokens_per_s'] / tok - 1:+.0%} | {tpot:.2f} | "
                  f"{predicted['tpot_ms_p50']:.2f} | {predicted['tpot_ms_p50'] / tpot - 1:+.0%} | "
                  f"{row['ttft_ms']['p50']:.0f} / {predicted['ttft_ms_p50']:.0f} | {predicted['prefill_share']:.0%} |")
            found.append((f"{path.stem.replace('_', ' ')} m={row['microbatches']}", tok, predicted["tokens_per_s"]))
    return found


MIXTRAL_4_LAYERS = dict(hidden_size=4096, num_layers=4, num_heads=32, num_kv_heads=8, head_dim=128,
                        intermediate_size=14336, num_experts=8, top_k=2, vocab_size=32000,
                        max_position_embeddings=1024)  # benchmarks/gpu_lockstep.sh's mixtral (random weights)
# 2 x H200 (RESULTS.md, "Ping-pong and disaggregated against colocated on 2 x H200"): (label, JSON, row, cold). Each
# sweep's first row ran cold (Triton variants compiled during its timed requests).
S15 = "../session15/"
S16 = "../session16/"
S17 = "../session17/"
GPU_ROWS = [
    ("Qwen3 c=64 1+1 m=1, run 1", "run1_serve_qwen3_c64_disagg_ipc.json", 0, True),
    ("Qwen3 c=64 1+1 m=2, run 1", "run1_serve_qwen3_c64_disagg_ipc.json", 1, False),
    ("Qwen3 c=64 1+1 m=3, run 1", "run1_serve_qwen3_c64_disagg_ipc.json", 2, False),
    ("Qwen3 c=64 1+1 m=4, run 1", "run1_serve_qwen3_c64_disagg_ipc.json", 3, False),
    ("Qwen3 c=64 1+1 m=1, run 2", "run2_serve_qwen3_c64_disagg_ipc.json", 0, True),
    ("Qwen3 c=64 1+1 m=3, run 2", "run2_serve_qwen3_c64_disagg_ipc.json", 1, False),
    ("Qwen3 c=64 colocated-2, run 1", "run1_serve_qwen3_c64_colocated.json", 0, False),
    ("Qwen3 c=256 1+1 m=1, run 1", "run1_serve_qwen3_c256_disagg_ipc.json", 0, True),
    ("Qwen3 c=256 1+1 m=2, run 1", "run1_serve_qwen3_c256_disagg_ipc.json", 1, False),
    ("Qwen3 c=256 1+1 m=4, run 1", "run1_serve_qwen3_c256_disagg_ipc.json", 2, False),
    ("Qwen3 c=256 colocated-2, run 1", "run1_serve_qwen3_c256_colocated.json", 0, False),
    ("Mixtral c=64 1+1 m=1, run 3", "run3_serve_mixtral_c64_disagg_ipc.json", 0, True),
    ("Mixtral c=64 1+1 m=2, run 3", "run3_serve_mixtral_c64_disagg_ipc.json", 1, False),
    ("Mixtral c=64 colocated-2, run 3", "run3_serve_mixtral_c64_colocated.json", 0, False),
    # the fifth session's longer rows (8 requests per slot; RESULTS.md, "Fifth session on 2 x H200"): sweep order
    # m = 2, 1, 3, so its first row, m = 2, is the cold one
    ("Qwen3 c=64 1+1 m=2, session 5", "../serve5/serve_qwen3_c64_disagg_ipc.json", 0, True),
    ("Qwen3 c=64 1+1 m=1, session 5", "../serve5/serve_qwen3_c64_disagg_ipc.json", 1, False),
    ("Qwen3 c=64 1+1 m=3, session 5", "../serve5/serve_qwen3_c64_disagg_ipc.json", 2, False),
    ("Qwen3 c=64 colocated-2, session 5", "../serve5/serve_qwen3_c64_colocated.json", 0, False),
    ("Qwen3 c=256 1+1 m=2, session 5", "../serve5/serve_qwen3_c256_disagg_ipc.json", 0, True),
    ("Qwen3 c=256 1+1 m=1, session 5", "../serve5/serve_qwen3_c256_disagg_ipc.json", 1, False),
    # the seventh session's (RESULTS.md, "Seventh session on 2 x H200"): 4 gateway processes, fused kernels as now;
    # "async": --async-scheduling
    ("Mixtral c=64 1+1 m=1, session 7", "../session7/serve_mixtral_c64_disagg_ipc.json", 0, False),
    ("Mixtral c=64 1+1 m=2, session 7", "../session7/serve_mixtral_c64_disagg_ipc.json", 1, False),
    ("Mixtral c=64 colocated-2, session 7", "../session7/serve_mixtral_c64_colocated.json", 0, False),
    ("Qwen3 c=64 1+1 m=1 ipc-sm, session 7", "../session7/serve_qwen3_c64_disagg_ipc-sm.json", 0, False),
    ("Qwen3 c=64 1+1 m=1 async, session 7", "../session7/serve_qwen3_c64_disagg_ipc_async.json", 0, False),
    ("Qwen3 c=64 colocated-2 async, session 7", "../session7/serve_qwen3_c64_colocated_async.json", 0, False),
    ("Mixtral c=64 1+1 m=1 async, session 7", "../session7/serve_mixtral_c64_disagg_ipc_async.json", 0, False),
    ("Mixtral c=64 colocated-2 async, session 7", "../session7/serve_mixtral_c64_colocated_async.json", 0, False),
    ("Qwen3 c=256 1+1 m=1 async, session 7", "../session7/serve_qwen3_c256_disagg_ipc_async.json", 0, False),
    ("Qwen3 c=256 colocated-2 async, session 7", "../session7/serve_qwen3_c256_colocated_async.json", 0, False),
    # the eighth session's (RESULTS.md, "Eighth session"): bench serve's own client, async scheduling (the default);
    # "long": one wave of 3500-3584-token prompts and 1024 output tokens, chunked prefill
    ("Qwen3 c=64 1+1 m=1, session 8", "../session8/short/serve_qwen3_c64_disagg_ipc.json", 0, False),
    ("Qwen3 c=64 colocated-2, session 8", "../session8/short/serve_qwen3_c64_colocated.json", 0, False),
    ("Mixtral c=64 1+1 m=1, session 8", "../session8/short/serve_mixtral_c64_disagg_ipc.json", 0, False),
    ("Mixtral c=64 colocated-2, session 8", "../session8/short/serve_mixtral_c64_colocated.json", 0, False),
    ("Qwen3 c=256 1+1 m=1, session 8", "../session8/short/serve_qwen3_c256_disagg_ipc.json", 0, False),
    ("Qwen3 c=256 colocated-2, session 8", "../session8/short/serve_qwen3_c256_colocated.json", 0, False),
    ("Mixtral c=256 1+1 m=1, session 8", "../session8/short/serve_mixtral_c256_disagg_ipc.json", 0, False),
    ("Mixtral c=256 colocated-2, session 8", "../session8/short/serve_mixtral_c256_colocated.json", 0, False),
    ("Qwen3 long c=128 1+1 m=1, session 8", "../session8/long/serve_qwen3_p8192_c128_disagg_ipc.json", 0, False),
    ("Qwen3 long c=128 1+1 m=2, session 8", "../session8/long/serve_qwen3_p8192_c128_disagg_ipc.json", 1, False),
    ("Qwen3 long c=256 1+1 m=1, session 8", "../session8/long/serve_qwen3_p8192_c256_disagg_ipc.json", 0, False),
    ("Qwen3 long c=256 1+1 m=2, session 8", "../session8/long/serve_qwen3_p8192_c256_disagg_ipc.json", 1, False),
    ("Qwen3 long c=256 1+1 m=3, session 8", "../session8/long/serve_qwen3_p8192_c256_disagg_ipc.json", 2, False),
    ("Qwen3 long c=256 colocated-2, session 8", "../session8/long/serve_qwen3_p8192_c256_colocated.json", 0, False),
    # the ninth session's (RESULTS.md, "Ninth session"): steps with prompts replay CUDA graphs (up to 512 tokens;
    # "eager": --prefill-graph-tokens 0, as before; "no cap": up to the step's budget, now the default)
    ("Qwen3 c=64 1+1 m=1, session 9", "../session9/short_cap512/serve_qwen3_c64_disagg_ipc.json", 0, False),
    ("Qwen3 c=64 colocated-2, session 9", "../session9/short_cap512/serve_qwen3_c64_colocated.json", 0, False),
    ("Mixtral c=64 1+1 m=1, session 9", "../session9/short_cap512/serve_mixtral_c64_disagg_ipc.json", 0, False),
    ("Mixtral c=64 colocated-2, session 9", "../session9/short_cap512/serve_mixtral_c64_colocated.json", 0, False),
    ("Qwen3 c=64 1+1 m=1 eager, session 9", "../session9/short_eager/serve_qwen3_c64_disagg_ipc_g0.json", 0, False),
    ("Qwen3 c=64 colocated-2 eager, session 9", "../session9/short_eager/serve_qwen3_c64_colocated_g0.json", 0, False),
    ("Mixtral c=64 1+1 m=1 eager, session 9", "../session9/short_eager/serve_mixtral_c64_disagg_ipc_g0.json", 0,
     False),
    ("Mixtral c=64 colocated-2 eager, session 9", "../session9/short_eager/serve_mixtral_c64_colocated_g0.json", 0,
     False),
    ("Qwen3 c=256 1+1 m=1, session 9", "../session9/c256_cap512/serve_qwen3_c256_disagg_ipc.json", "m=1", False),
    ("Qwen3 c=256 1+1 m=2, session 9", "../session9/c256_cap512/serve_qwen3_c256_disagg_ipc.json", "m=2", False),
    ("Qwen3 c=256 1+1 m=1 no cap, session 9", "../session9/c256_nocap/serve_qwen3_c256_disagg_ipc_g2048.json", 0,
     False),
    ("Qwen3 c=256 colocated-2, session 9", "../session9/c256_cap512/serve_qwen3_c256_colocated.json", 0, False),
    ("Mixtral c=256 1+1 m=1, session 9", "../session9/c256_cap512/serve_mixtral_c256_disagg_ipc.json", "m=1", False),
    ("Mixtral c=256 1+1 m=2, session 9", "../session9/c256_cap512/serve_mixtral_c256_disagg_ipc.json", "m=2", False),
    ("Mixtral c=256 colocated-2, session 9", "../session9/c256_cap512/serve_mixtral_c256_colocated.json", 0, False),
    # the tenth session's (RESULTS.md, "Tenth session"): every step replays a graph (no cap), each configuration
    # served twice (MICROBATCHES="1 2 2 1"), the median of the two
    ("Qwen3 c=256 1+1 m=1, session 10", "../session10/c256/serve_qwen3_c256_disagg_ipc.json", "m=1", False),
    ("Qwen3 c=256 1+1 m=2, session 10", "../session10/c256/serve_qwen3_c256_disagg_ipc.json", "m=2", False),
    ("Qwen3 long c=128 1+1 m=1, session 10", "../session10/long_c128/serve_qwen3_p8192_c128_disagg_ipc.json", "m=1",
     False),
    ("Qwen3 long c=128 1+1 m=2, session 10", "../session10/long_c128/serve_qwen3_p8192_c128_disagg_ipc.json", "m=2",
     False),
    ("Qwen3 long c=256 1+1 m=1, session 10", "../session10/long_c256/serve_qwen3_p8192_c256_disagg_ipc.json", "m=1",
     False),
    ("Qwen3 long c=256 1+1 m=2, session 10", "../session10/long_c256/serve_qwen3_p8192_c256_disagg_ipc.json", "m=2",
     False),
    # the eleventh session's (RESULTS.md, "Eleventh session"): the host's block tables mirrored; call 1 before that,
    # call 2 after; the colocated rows split their tokens 71 : 29 (call 3) and 62 : 38 (call 4) between the GPUs
    ("Qwen3 long c=256 1+1 m=2, session 11 call 1", "../session11/call1/serve_qwen3_p8192_c256_disagg_ipc.json", 0,
     False),
    ("Qwen3 long c=256 1+1 m=1, session 11 call 1", "../session11/call1/serve_qwen3_p8192_c256_disagg_ipc.json", 1,
     False),
    ("Qwen3 long c=256 1+1 m=2, session 11 call 2", "../session11/call2/serve_qwen3_p8192_c256_disagg_ipc.json", 0,
     False),
    ("Qwen3 long c=256 1+1 m=1, session 11 call 2", "../session11/call2/serve_qwen3_p8192_c256_disagg_ipc.json", 1,
     False),
    ("Qwen3 long c=256 1+1 m=3, session 11", "../session11/call3/serve_qwen3_p8192_c256_disagg_ipc_m3.json", 0,
     False),
    ("Qwen3 long c=256 colocated-2, session 11 call 3", "../session11/call3/serve_qwen3_p8192_c256_colocated.json",
     0, False),
    ("Qwen3 long c=256 colocated-2, session 11 call 4", "../session11/call4/serve_qwen3_p8192_c256_colocated.json",
     0, False),
    # call 5, after the gateway's routing fix (claims): the colocated split even
    ("Qwen3 long c=256 colocated-2, session 11 call 5", "../session11/call5/serve_qwen3_p8192_c256_colocated.json",
     0, False),
    ("Qwen3 c=256 1+1 m=1, session 11", "../session11/call5/serve_qwen3_c256_disagg_ipc.json", 0, False),
    ("Qwen3 c=256 1+1 m=2, session 11", "../session11/call5/serve_qwen3_c256_disagg_ipc.json", 1, False),
    ("Mixtral long c=256 1+1 m=1, session 13", "../session13/call4/x/serve_mixtral_p8192_c256_disagg_ipc.json", 0,
     False),
    ("Mixtral long c=256 1+1 m=2, session 13", "../session13/call4/x/serve_mixtral_p8192_c256_disagg_ipc.json", 1,
     False),
    ("Mixtral long c=256 1+1 m=3, session 13", "../session13/call5/y/serve_mixtral_p8192_c256_disagg_ipc.json", 0,
     False),
    ("Mixtral long c=256 1+1 m=4, session 13", "../session13/call5/y/serve_mixtral_p8192_c256_disagg_ipc.json", 1,
     False),
    ("Mixtral long c=256 colocated-2, session 13", "../session13/call4/x/serve_mixtral_p8192_c256_colocated.json",
     0, False),
    # the twelfth session's: the same row, twice the requests, bench serve's client in 2 processes (58% busy each)
    ("Qwen3 c=256 1+1 m=1, 2 clients, session 12", "../session12/call5/serve_qwen3_c256_disagg_ipc.json", 0, False),
    # the fifteenth session's (the fourteenth's gateway), 2 client processes: `GPUS=2 PLAN_PARTS=short|long
    # bash benchmarks/gpu_plan_rows.sh`
    *[(f"{shape} c=256 {what}, session 15", f"{S15}call{call}/short/serve_{shape.lower()}_c256_{name}.json", index,
       False) for shape, call in (("Qwen3", 1), ("Mixtral", 2))
      for what, name, index in (("1+1 m=1", "disagg_ipc", 0), ("1+1 m=2", "disagg_ipc", 1),
                                ("colocated-2", "colocated", 0))],
    ("Qwen3 long c=256 1+1 m=1, session 15", S15 + "call2/long/serve_qwen3_p8192_c256_disagg_ipc.json", 0, False),
    ("Qwen3 long c=256 1+1 m=2, session 15", S15 + "call2/long/serve_qwen3_p8192_c256_disagg_ipc.json", 1, False),
    ("Qwen3 long c=256 colocated-2, session 15", S15 + "call2/long/serve_qwen3_p8192_c256_colocated.json", 0, False),
]
# the twelfth session's, on one H200 (RESULTS.md, "Twelfth session"): both nodes on the GPU under CUDA MPS, or
# colocated; the code of the eleventh session's rows (block tables mirrored, routing claims). Call 1: one client
# process (88% busy); call 2: four, which took CPU from the gateways (98% busy each); "long": 3.5k-token prompts,
# 1024 output tokens; "70/30": the attention node on 70% of the SMs, the expert node on 30% (types: share_type)
S12, S13, S14 = "../session12/", "../session13/", "../session14/"
ONE_GPU_ROWS = [
    ("one H200: Qwen3 c=256 1+1 m=1, session 12 call 1", S12 + "call1/serve_qwen3_c256_disagg_ipc.json", 0, False),
    ("one H200: Qwen3 c=256 1+1 m=2, session 12 call 1", S12 + "call1/serve_qwen3_c256_disagg_ipc.json", 1, False),
    ("one H200: Qwen3 c=256 colocated, session 12 call 1", S12 + "call1/serve_qwen3_c256_colocated.json", 0, False),
    ("one H200: Qwen3 c=256 1+1 m=1, 4 clients, session 12 call 2", S12 + "call2/serve_qwen3_c256_disagg_ipc.json",
     0, False),
    ("one H200: Qwen3 c=256 colocated, 4 clients, session 12 call 2", S12 + "call2/serve_qwen3_c256_colocated.json",
     0, False),
    ("one H200: Mixtral c=256 1+1 m=1, 4 clients, session 12 call 2",
     S12 + "call2/serve_mixtral_c256_disagg_ipc.json", 0, False),
    ("one H200: Qwen3 long c=256 1+1 m=1, session 12", S12 + "call3/l/serve_qwen3_p8192_c256_disagg_ipc.json", 0,
     False),
    ("one H200: Qwen3 long c=256 colocated, session 12", S12 + "call3/l/serve_qwen3_p8192_c256_colocated.json", 0,
     False),
    ("one H200: Qwen3 long c=256 1+1 m=2, session 12", S12 + "call4/l/m2.json", 0, False),
    ("one H200: Qwen3 long c=256 1+1 m=1 70/30, session 12",
     S12 + "call4/l/serve_qwen3_p8192_c256_disagg_ipc_sm70_30.json", 0, False),
    ("one H200: Mixtral c=256 1+1 m=1, session 13 call 1", S13 + "call1/serve/serve_mixtral_c256_disagg_ipc.json", 0, False),
    ("one H200: Mixtral c=256 colocated, session 13 call 1", S13 + "call1/serve/serve_mixtral_c256_colocated.json", 0, False),
    ("one H200: Qwen3 c=256 1+1 m=1, session 13 call 3", S13 + "call3/serve/serve_qwen3_c256_disagg_ipc.json", 0,
     False),
    ("one H200: Qwen3 c=256 colocated, session 13 call 3", S13 + "call3/serve/serve_qwen3_c256_colocated.json", 0,
     False),
    ("one H200: Mixtral c=256 1+1 m=1, session 13 call 3", S13 + "call3/serve/serve_mixtral_c256_disagg_ipc.json", 0,
     False),
    ("one H200: Mixtral c=256 colocated, session 13 call 3", S13 + "call3/serve/serve_mixtral_c256_colocated.json", 0,
     False),
    # the fourteenth session's gateway: queued tokens merged into one chunk, one listening socket for all
    ("one H200: Qwen3 c=256 1+1 m=1, session 14 call 1", S14 + "call1/serve/serve_qwen3_c256_disagg_ipc.json", 0,
     False),
    ("one H200: Qwen3 c=256 colocated, session 14 call 1", S14 + "call1/serve/serve_qwen3_c256_colocated.json", 0,
     False),
    ("one H200: Mixtral c=256 1+1 m=1, session 14 call 1", S14 + "call1/serve/serve_mixtral_c256_disagg_ipc.json", 0,
     False),
    ("one H200: Mixtral c=256 colocated, session 14 call 1", S14 + "call1/serve/serve_mixtral_c256_colocated.json", 0,
     False),
    # the same at 7 gateway processes (what `expertmesh plan` asks for 70% busy at most), one client process
    ("one H200: Qwen3 c=256 1+1 m=1, 7 gateways, session 14 call 3", S14 + "call3/serve/serve_qwen3_c256_disagg_ipc.json",
     0, False),
    ("one H200: Qwen3 c=256 colocated, 7 gateways, session 14 call 3", S14 + "call3/serve/serve_qwen3_c256_colocated.json",
     0, False),
    # the twelfth session's call 2 again, four client processes, the fourteenth session's gateway (its Qwen3 1+1 row's
    # JSON did not come back: 36776 tok/s in call4/a.log)
    *[(f"one H200: {shape} c=256 {what}, 4 clients, session 15 call 4",
       f"{S15}call4/serve_{shape.lower()}_c256_{name}.json", 0, False)
      for shape, what, name in (("Qwen3", "colocated", "colocated"), ("Mixtral", "1+1 m=1", "disagg_ipc"),
                                ("Mixtral", "colocated", "colocated"))],
    # the same, each call's host first probed by `bench gateway` at 1 and 4 client processes (<call>/gw: host_probe),
    # and in call 2 the one-client Qwen3 rows beside them
    *[(f"one H200: {shape} c=256 {what}{clients}, session 16 call {call}",
       f"{S16}call{call}/{folder}/serve_{shape.lower()}_c256_{name}.json", 0, False)
      for call, folder, shape, clients in ((1, "q", "Qwen3", ", 4 clients"), (2, "m", "Mixtral", ", 4 clients"),
                                           (2, "q1", "Qwen3", ""))
      for what, name in (("1+1 m=1", "disagg_ipc"), ("colocated", "colocated"))],
    # the seventeenth session: the first rows whose gateways detokenize without re-reading special ids (TextStream,
    # 16th session); m = 2 beside its colocated row in calls 5 and 6. Call 1's Qwen3 JSONs did not come back (its
    # all.log has their lines); call 4 ran them again.
    *[(f"one H200: {shape} c=256 {what}{clients}, session 17 call {call}",
       f"{S17}call{call}/{folder}/serve_{shape.lower()}_c256_{name}.json", 0, False)
      for call, folder, shape, clients, m in ((1, "m", "Mixtral", ", 4 clients", 1), (4, "q", "Qwen3", ", 4 clients", 1),
                                              (4, "q1", "Qwen3", "", 1), (5, "m1", "Mixtral", "", 1),
                                              (5, "q2", "Qwen3", ", 4 clients", 2),
                                              (6, "m2", "Mixtral", ", 4 clients", 2))
      for what, name in ((f"1+1 m={m}", "disagg_ipc"), ("colocated", "colocated"))],
]
GPU_SERVE = HERE / "gpu_multi/serve"
# The served calibrations: the warm rows whose both GPU meters worked (run 1's zeroed its counters at each replay)
GPU_SERVED = {"/tmp/qwen3": ("../session9/short_cap512/serve_qwen3_c64_disagg_ipc.json", 0),
              "/tmp/mixtral": ("../session9/short_cap512/serve_mixtral_c64_disagg_ipc.json", 0)}
GPU_COLOCATED = ("../session9/short_cap512/serve_mixtral_c64_colocated.json", 0)
LONG_CONTEXT_OF = {"/tmp/qwen3_p8192": "/tmp/qwen3", "/tmp/mixtral_p8192": "/tmp/mixtral"}  # its served calibration
# their prefill lines, measured at their prompt length (the shipped bench_layer_2.json has no prefill rows, so the
# model's prefill was the decode line's efficiency, ~5x too fast for 3.5k-token prompts): `bench layer --shapes
# /tmp/qwen3_p8192 --prefill-tokens 1024,2048 --prompt-len 3584` on an H200 (RESULTS.md, eleventh session)
LONG_PREFILL = "../session11/call4/layer_qwen3_long.json"
PREFILL_OF_LONG = "--no-long-prefill" not in sys.argv[1:]
# what a served disaggregated decode step spends outside its graph (sampling over the vocabulary, copies): measured
# on the eleventh session's traced m = 1 and m = 2 pair (gpu_timeline.outside_graph_us: 397 and 308 us), applied
# to that session's disaggregated rows, the code those traces ran (`--no-outside-graph`: left out)
OUTSIDE_GRAPH_TRACES = ["../session11/call2/serve_qwen3_p8192_c256_disagg_ipc.trace.m1.json.gz",
                        "../session11/call2/serve_qwen3_p8192_c256_disagg_ipc.trace.m2.json.gz"]
# the code those traces ran, and after
OUTSIDE_GRAPH_ROWS = ("../session11/", "../session12/", "../session13/", "../session14/", S15, S16, S17)
OUTSIDE_GRAPH = "--no-outside-graph" not in sys.argv[1:]
# what a graphed step with short prompts adds to each layer's attention (gpu_timeline.mixed_attention_extra_us), per
# model, from a traced 1+1 short row of the fourteenth session (not a row of the table): applied to every current
# row (their steps with prompts replay graphs; the long rows' prompts take the prefill line instead, perf.closed_loop)
MIXED_TRACES = {"/tmp/qwen3": "../session14/call4/tr/serve_qwen3_c256_disagg_ipc.trace.json.gz",
                "/tmp/mixtral": "../session14/call4/tr/serve_mixtral_c256_disagg_ipc.trace.json.gz"}
MIXED = "--no-mixed-attention" not in sys.argv[1:]
# the rows served by the code the model describes now (the host's block tables mirrored, the gateway's routing
# claims: eleventh session on); older rows ran host paths since replaced (eager prefill, the httpx client, ...)
CURRENT_ROWS = OUTSIDE_GRAPH_ROWS
# of those, the rows whose gateways kept special ids out of TextStream's window (seventeenth session on): before,
# a random model's tokens cost a gateway 71-91 us each, and on the slowest hosts its four gateways bound the row
MENDED_GATEWAY_ROWS = (S17,)


def mixed_attention_extra_us() -> dict[str, float]:
    """Per model, MIXED_TRACES' extra attention per layer of a graphed step with prompts."""
    import gpu_timeline  # benchmarks/, this script's folder
    return {model: gpu_timeline.mixed_attention_extra_us(gpu_timeline.read_trace(GPU_SERVE / trace))
            for model, trace in MIXED_TRACES.items()}


def outside_graph_us() -> float:
    """The mean of OUTSIDE_GRAPH_TRACES' outside-graph times."""
    import gpu_timeline  # benchmarks/, this script's folder
    values = [gpu_timeline.outside_graph_us(gpu_timeline.read_trace(GPU_SERVE / t)) for t in OUTSIDE_GRAPH_TRACES]
    return sum(values) / len(values)
# `--own-gateway-cpu`: each row's served terms with the gateway CPU per token that row measured (its cpu_s), not
# the served calibration's: what is left once the host's CPU contention (a load generator beside the gateways, on the
# same cores) is given
HOST_LATENCY = "--no-host-latency" not in sys.argv[1:]
OWN_GATEWAY_CPU = "--own-gateway-cpu" in sys.argv[1:]
# the served parts as their excess over bench layer (the shipped GPU rule); `--served-factors`: as a ratio to it
ADDITIVE = "--served-factors" not in sys.argv[1:]
# host time per step per sequence on the GPU rows: served.GPU_STEP_HOST_PER_SEQUENCE_US (the CPU traces' Python parts);
# `--host-per-sequence-us 0` gives the constant host time of the earlier tables
HOST_PER_SEQUENCE_US = next((float(sys.argv[i + 1]) for i, a in enumerate(sys.argv[:-1])
                             if a == "--host-per-sequence-us"), served.GPU_STEP_HOST_PER_SEQUENCE_US)


def in_flight(args: dict, row: dict) -> int:
    """Requests the row really kept in flight: rows measured before `bench serve`'s client lifted httpx's pool of
    100 connections (they lack client_cpu_s) had at most 100, whatever their concurrency."""
    return args["concurrency"] if "client_cpu_s" in row else min(args["concurrency"], 100)


def gpu_spec_of(model: str) -> ModelSpec:
    from expertmesh.model.make_model import RandomModelShape, hf_config
    if model in ("/tmp/mixtral", "/tmp/mixtral_p8192"):  # MAX_POS=8192: room for long contexts
        positions = 8192 if model.endswith("_p8192") else 1024
        return ModelSpec.from_hf_config(hf_config(RandomModelShape(
            **{**MIXTRAL_4_LAYERS, "max_position_embeddings": positions}), 1, 2))
    return spec_of(model)


# the experts alone from 1 to 2048 tokens, across Mixtral's ridge, with the flops their kernel computes (`TESTS=none
# POLL=0 bash benchmarks/gpu_expert_line.sh` on one H200, thirteenth session): their rows join the experts' fit
EXPERTS_LINE = str(HERE / "gpu_multi/session13/call3/experts_alone.json")


def gpu_bench_setup() -> tuple[calibration.Calibration, GpuType]:
    """The H200 bench calibration: bench layer (gpu_dataplane/bench_layer_2.json, Triton fused MoE) and the ipc M2N
    round between the two GPUs (gpu_multi/bench_ipc.json): the shipped calibration.H200's inputs, step overhead 0."""
    cal = calibration.from_benchmarks("H200", [str(HERE / "gpu_dataplane/bench_layer_2.json"), EXPERTS_LINE],
                                      str(HERE / "gpu_multi/bench_ipc.json"), "triton", "lockstep-ipc",
                                      4.8e12, 9.89e14, 4.5e11)
    return cal, BUILTIN["H200"]


# The gateway's CPU per token and per step message: the median over four rows of the gateway of today, served as the
# fourteenth session's call 1 was (4 gateways, 1 client process): the seventeenth session's calls 4 and 5, the first
# whose TextStream kept special ids out of its window (43-46 us a token). The fourteenth session's call 1 rows (53-68
# us, a median of 58) ran before that; the ninth session's, an older gateway still (68-78 us).
GATEWAY_ROWS = [f"{S17}call{call}/{folder}/serve_{shape}_c256_{kind}.json"
                for call, folder, shape in ((4, "q1", "qwen3"), (5, "m1", "mixtral")) for kind in ("disagg_ipc", "colocated")]


def host_probe(row_json: Path, workers: int, client_processes: int, model: str) -> Path | None:
    """The `bench gateway` JSON of the row's device call, at its gateways and client processes, where the call ran
    one first (gpu_gateway.sh into <call>/gw/): with the tokenizer of the row's model shape where there is one
    (gateway_<shape>_w<W>_c<C>.json), else with the shipped model's (gateway_w<W>_c<C>.json, the sixteenth
    session's calls 1 and 2); None where the call ran none."""
    shape = Path(model).name.split("_")[0]  # /tmp/qwen3_p8192: qwen3
    for call in row_json.parents:
        for name in (f"gateway_{shape}_w{workers}_c{client_processes}.json",
                     f"gateway_w{workers}_c{client_processes}.json"):
            if (call / "gw" / name).exists():
                return call / "gw" / name
        if call.name.startswith("call") or call == GPU_SERVE:
            return None
    return None


def gateway_rows_costs() -> tuple[float, float]:
    """(CPU µs per output token, per step message) of the gateway: GATEWAY_ROWS' median per token."""
    costs = [served.gateway_costs(run["args"], run["rows"][0])
             for run in (json.loads((GPU_SERVE / name).read_text()) for name in GATEWAY_ROWS)]
    return statistics.median(token for token, _ in costs), costs[0][1]


def gpu_served_setups(cal: calibration.Calibration, device: GpuType) -> tuple[dict, float, dict]:
    """Per model, the bench calibration with what a served 1+1 row of it measured (served.gpu_phases_of: the parts'
    device time per span, the host time between steps); and the host time between a colocated node's steps."""
    from expertmesh.planner.perf import ModelCosts, comm_us
    calibrations, phases = {}, {}
    per_token, per_message = gateway_rows_costs()
    for model, (name, index) in GPU_SERVED.items():
        run, spec = json.loads((GPU_SERVE / name).read_text()), gpu_spec_of(model)
        m = run["rows"][index]["microbatches"]
        one_plus_one = Deployment(device, device, 1, 1, m, run["args"]["max_num_seqs"], 0)
        crossing = comm_us(ModelCosts(spec), one_plus_one, cal, run["args"]["concurrency"] / m)
        phases[model], tokens = served.gpu_phases_of(run, index, spec, crossing)
        context = sum(run["args"]["input_len"]) / 2 + sum(run["args"]["output_len"]) / 4
        fitted = served.served_calibration(cal, phases[model], spec, device, tokens, context, 2,
                                           additive=ADDITIVE)
        fitted = served.with_host_per_sequence(fitted, tokens * m, HOST_PER_SEQUENCE_US)
        calibrations[model] = dataclasses.replace(fitted, gateway_us_per_token=per_token,
                                                  gateway_us_per_message=per_message)
    name, index = GPU_COLOCATED
    run = json.loads((GPU_SERVE / name).read_text())
    colocated, sequences = served.gpu_phases_of(run, index, gpu_spec_of(run["args"]["model"]), 0.0)
    fitted = dataclasses.replace(cal, step_overhead_us=colocated.step_host_us)
    fitted = served.with_host_per_sequence(fitted, sequences, HOST_PER_SEQUENCE_US)
    calibrations["colocated"] = dataclasses.replace(fitted, gateway_us_per_token=per_token,
                                                    gateway_us_per_message=per_message)
    return calibrations, colocated.step_host_us, phases


def with_prefill_of(cal: calibration.Calibration, layer_json: Path) -> calibration.Calibration:
    """cal with the prefill lines of a bench layer JSON's prefill rows (Triton fused MoE)."""
    attention, experts = calibration.fit_prefill(json.loads(layer_json.read_text()), "triton")
    return dataclasses.replace(cal, prefill_attention=attention, prefill_experts=experts)


def row_predictor(cal: calibration.Calibration, device: GpuType, served_cals: dict, outside: float,
                  mixed_extra: dict):
    """predict(JSON name, row index, one GPU, host latency µs) -> (args, row, bench-only closed loop, served-terms
    closed loop) of a served GPU row: its cluster and workload replayed with the bench calibration alone and with
    the served terms (and the row's device call's gateway probe, where it made one)."""
    one_gpu_round = calibration.fit_round(json.loads((HERE / "gpu_lockstep/graphs/bench_transport.json").read_text()),
                                          "lockstep-ipc")

    def predict(name: str, index: int, one_gpu: bool, latency: float) -> tuple[dict, dict, dict, dict]:
        run = json.loads((GPU_SERVE / name).read_text())
        args, row = run["args"], row_of(run, index)
        spec = gpu_spec_of(args["model"])
        # SM shares: each role a GPU type of its own, from bench layer under its share in the same device call
        attention_gpu, expert_gpu = (share_type(device, cal, p, (GPU_SERVE / name).parent)
                                     for p in args["sm_percent"]) if args.get("sm_percent") else (device, device)
        plan = Deployment(attention_gpu, None if args["expert_nodes"] == 0 else expert_gpu, args["attention_nodes"],
                          args["expert_nodes"], row["microbatches"], args["max_num_seqs"], 0,
                          shared_devices=1 if one_gpu else 0, async_scheduling=bool(args.get("async_scheduling")))
        workers = args.get("gateway_workers") or 1
        waits = args.get("max_waiting_steps", 0)
        model = LONG_CONTEXT_OF.get(args["model"], args["model"])
        served_cal = served_cals[model if not plan.colocated else "colocated"]
        row_cal = cal
        if args["model"] in LONG_CONTEXT_OF and PREFILL_OF_LONG:
            row_cal, served_cal = (with_prefill_of(c, GPU_SERVE / LONG_PREFILL) for c in (cal, served_cal))
        if name.startswith(OUTSIDE_GRAPH_ROWS) and OUTSIDE_GRAPH:
            row_cal, served_cal = (dataclasses.replace(c, step_outside_graph_us=outside) for c in (row_cal, served_cal))
        if name.startswith(CURRENT_ROWS) and MIXED:
            row_cal, served_cal = (dataclasses.replace(c, mixed_attention_extra_us=mixed_extra[model])
                                   for c in (row_cal, served_cal))
        if one_gpu:  # both nodes on one GPU: the round between two processes on it (one-GPU lockstep bench)
            row_cal, served_cal = (dataclasses.replace(c, round=one_gpu_round, round_link_bytes_per_s=None)
                                   for c in (row_cal, served_cal))
        probe = host_probe(GPU_SERVE / name, workers, args.get("client_processes") or 1, args["model"])
        if probe:  # its device call's `bench gateway` run: this host's gateway, measured apart from the row
            per_token, per_message = calibration.bench_gateway_costs(json.loads(probe.read_text())["runs"])
            served_cal = dataclasses.replace(served_cal, gateway_us_per_token=per_token,
                                             gateway_us_per_message=per_message)
        if OWN_GATEWAY_CPU and row.get("cpu_s"):  # the CPU the row's gateways took per token, as an input
            per_token, per_message = served.gateway_costs(args, row)
            served_cal = dataclasses.replace(served_cal, gateway_us_per_token=per_token,
                                             gateway_us_per_message=per_message)
        served_cal = dataclasses.replace(served_cal, host_latency_us=latency)
        # the split the gateways made (rows that count each node's tokens; session 9 on): an input, not a speed
        shares = [row["tokens_per_node"][f"a{i}"] for i in range(args["attention_nodes"])] \
            if args["attention_nodes"] > 1 and row.get("tokens_per_node") else None
        bench = closed_loop(spec, plan, row_cal, jobs_of(args), in_flight(args, row), gateway_workers=workers,
                            max_waiting_steps=waits, prefill_graph_tokens=prefill_graphs(args), node_shares=shares)
        with_served = closed_loop(spec, plan, served_cal, jobs_of(args), in_flight(args, row),
                                  gateway_workers=workers, max_waiting_steps=waits,
                                  prefill_graph_tokens=prefill_graphs(args), node_shares=shares)
        return args, row, bench, with_served

    return predict


def host_latency_us(predict) -> float:
    """The host path's latency (client to node and back, beyond the gateway's CPU): the median over GATEWAY_ROWS,
    one-H200 rows of the gateway of today, of their TTFT p50 beyond the model's without it."""
    return statistics.median(row["ttft_ms"]["p50"] * 1e3 - served["ttft_ms_p50"] * 1e3
                             for row, served in (predict(name, 0, True, 0.0)[1::2] for name in GATEWAY_ROWS))


def gpu_main() -> int:
    """`--gpu-rows`: every 2 x H200 row, predicted from the bench calibration alone and with the served terms."""
    cal, device = gpu_bench_setup()
    served_cals, colocated_host_us, phases = gpu_served_setups(cal, device)
    outside = outside_graph_us()
    print(f"disaggregated decode step outside its graph: {outside:.0f} us ({', '.join(OUTSIDE_GRAPH_TRACES)})",
          file=sys.stderr)
    mixed_extra = mixed_attention_extra_us()
    print("a graphed step with prompts, attention per layer beyond its tokens as decodes: " + ", ".join(
        f"{model} {us:+.0f} us" for model, us in mixed_extra.items()), file=sys.stderr)
    for model, p in phases.items():
        print(f"{model}: served T_a {p.attention_segment_us:.0f} us, T_e {p.expert_compute_us:.0f} us, host between "
              f"steps {p.step_host_us:.0f} us ({GPU_SERVED[model][0]} row {GPU_SERVED[model][1]})", file=sys.stderr)
    print(f"colocated: host between steps {colocated_host_us:.0f} us ({GPU_COLOCATED[0]})", file=sys.stderr)
    for model, c in served_cals.items():
        print(f"{model}: gateway CPU {c.gateway_us_per_token:.0f} us per output token and "
              f"{c.gateway_us_per_message:.0f} per step message; host per step "
              f"{c.step_overhead_us:.0f} us + {c.step_overhead_per_sequence_us:.0f} us per sequence", file=sys.stderr)
    print("| configuration | measured tok/s | predicted, bench only | error | predicted, served terms | error | "
          "measured TPOT p50 ms | predicted, bench / served | error (served) | TTFT p50 ms measured / served | "
          "mixed steps (model) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    predict = row_predictor(cal, device, served_cals, outside, mixed_extra)
    latency = host_latency_us(predict) if HOST_LATENCY else 0.0
    print(f"host path latency: {latency / 1e3:.1f} ms (the TTFT p50 of the rows of GATEWAY_ROWS beyond the model's)",
          file=sys.stderr)
    current = []  # (label, error) of the rows served by the code the model describes now
    for label, name, index, cold in GPU_ROWS + ONE_GPU_ROWS:
        one_gpu = (label, name, index, cold) in ONE_GPU_ROWS
        args, row, bench, with_served = predict(name, index, one_gpu, latency)
        tok, tpot = row["output_tokens_per_s"], row["tpot_ms"]["p50"]
        fitted = (name, index) in (*GPU_SERVED.values(), GPU_COLOCATED)
        print(f"| {label}{' (cold)' if cold else ''}{' (served calibration row)' if fitted else ''} | {tok:.0f} | "
              f"{bench['tokens_per_s']:.0f} | {bench['tokens_per_s'] / tok - 1:+.0%} | "
              f"{with_served['tokens_per_s']:.0f} | {with_served['tokens_per_s'] / tok - 1:+.0%} | {tpot:.2f} | "
              f"{bench['tpot_ms_p50']:.2f} / {with_served['tpot_ms_p50']:.2f} | "
              f"{with_served['tpot_ms_p50'] / tpot - 1:+.0%} | {row['ttft_ms']['p50']:.0f} / "
              f"{with_served['ttft_ms_p50']:.0f} | {with_served['mixed_step_share']:.0%} |")
        if name.startswith(CURRENT_ROWS):
            current.append((label, configuration(args, row, one_gpu), tok, with_served["tokens_per_s"]))
    within = [label for label, _, tok, predicted in current if abs(predicted / tok - 1) <= 0.15]
    print(f"\nrows served by the current code ({', '.join(CURRENT_ROWS)}): {len(within)} of {len(current)} within 15% "
          "on tok/s (served terms); beyond it: " + "; ".join(f"{label} {predicted / tok - 1:+.0%}" for label, _, tok,
                                                              predicted in current if label not in within))
    mended = [label for label, name, *_ in GPU_ROWS + ONE_GPU_ROWS if name.startswith(MENDED_GATEWAY_ROWS)]
    print(f"of them, served by today's gateway ({', '.join(MENDED_GATEWAY_ROWS)}): "
          f"{len([label for label in mended if label in within])} of {len(mended)} within 15%")
    print_configurations(current)
    return 0


def configuration(args: dict, row: dict, one_gpu: bool) -> tuple:
    """What the runs of one served configuration share: everything but where the JSON went and the host it ran on."""
    same = ("model", "attention_nodes", "expert_nodes", "transport", "gateway_workers", "client_processes",
            "concurrency", "num_requests", "input_len", "output_len", "max_num_seqs", "max_waiting_steps",
            "prefill_graph_tokens", "async_scheduling", "sm_percent")
    return (("one_gpu", one_gpu), ("microbatches", row["microbatches"]),
            *((key, json.dumps(args.get(key))) for key in same))


def by_configuration(current: list[tuple[str, object, float, float]]) -> dict:
    """(label, configuration, measured tok/s, predicted) rows grouped by configuration: for each, the error of the
    median prediction over the median measured, and its (label, measured, predicted) runs."""
    runs: dict[object, list] = {}
    for label, key, tok, predicted in current:
        runs.setdefault(key, []).append((label, tok, predicted))
    return {key: (statistics.median(p for *_, p in rows) / statistics.median(t for _, t, _ in rows) - 1, rows)
            for key, rows in runs.items()}


def print_configurations(current: list[tuple[str, tuple, float, float]]) -> None:
    """The count per configuration: the median of its runs against its prediction. A configuration served on
    different days (each device call is another machine) varied by up to 17% (Qwen3 1+1 m=1 on one H200: 41.6k on
    the thirteenth session's call 3, 48.0k and 48.7k on the twelfth's and fourteenth's). The fifteenth session set
    the four-client runs on one H200 apart, as bound by their load generator; the sixteenth's served them as fast as
    one client on the same hosts (RESULTS.md): the slow runs were the hosts', and count as any other."""
    runs = by_configuration(current)
    beyond = [f"{rows[0][0].split(', session')[0]} ({len(rows)} run{'s' if len(rows) > 1 else ''}, "
              f"{min(tok for _, tok, _ in rows):.0f}-{max(tok for _, tok, _ in rows):.0f} tok/s) {error:+.0%}"
              for error, rows in runs.values() if abs(error) > 0.15]
    print(f"configurations served by the current code: {len(runs) - len(beyond)} of {len(runs)} within 15% (the "
          f"median of their runs); beyond it: {'; '.join(beyond) or 'none'}")

if __name__ == "__main__":
    sys.exit(gpu_main() if "--gpu-rows" in sys.argv[1:] else main())
