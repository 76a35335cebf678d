"""What the roofline leaves out, fitted from our own measurements: `bench layer` JSON (each part's time against its
floor) and `bench transport` JSON (the M2N round against its bytes). Shipped: our H200 runs (benchmarks/RESULTS.md)."""
from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import ConfigError, read_structured


@dataclass(frozen=True)
class Linear:
    """time_us = overhead_us + slope * x + per_token_us * tokens: a fixed launch/host cost, the part that scales with
    the roofline floor (or bytes), and host work per token (CPU paths loop over sequences; 0 under CUDA graphs)."""
    overhead_us: float
    slope: float
    per_token_us: float = 0.0

    def __call__(self, x: float, tokens: float = 0.0) -> float:
        return self.overhead_us + self.slope * x + self.per_token_us * tokens


@dataclass(frozen=True)
class Served:
    """What disaggregated serving costs beyond the benchmarks, per M2N round and part (planner/served.py measures it
    from a traced 1x1 run). Colocated nodes run their parts back to back, as `bench layer` times them."""
    dispatch_us: float  # attention node, per expert node a microbatch goes to: its Dispatch built, sent, answer added
    answer_us: float  # expert node, per Dispatch it answers: the Combine sent
    crossing_us: float  # one way: what a round takes beyond compute and host work (the transport's threads waking)
    # CPU per round outside each node's phases (the transport's threads, the event loop): at m = 1 it runs while
    # the node waits, but it holds the node's GIL and a core, so it counts where the node has other work
    attention_background_us: float
    expert_background_us: float
    attention_factor: float  # a part's served time over its bench time: the core alternates between the roles'
    experts_factor: float  # processes, which leaves each part's working set cold
    # on a GPU, what a served part takes beyond its bench time instead, in µs per microbatch and layer (the factors
    # are then 1): the served span's excess is its extra kernels and launches, the same at any context, while the
    # part's own kernels scale with the bytes as bench layer measured them (a factor fitted at short contexts
    # scaled the long contexts' KV reads too: RESULTS.md, eighth session)
    attention_extra_us: float = 0.0
    experts_extra_us: float = 0.0
    # a round that waits for the slower of two expert nodes, over the median round: the mean of the larger of two
    # draws from the traced rounds, less their median (served.slower_of_two_us); 0: not measured (GPU meters)
    slower_of_two_us: float = 0.0
    # the factors measured at several batch sizes, (tokens a part computes, attention factor, experts factor) in
    # increasing tokens: a part's served time does not grow with its tokens as bench layer's line does (the CPU
    # rows' experts took 1.35x bench at 16 tokens and 0.87x at 32: RESULTS.md, seventeenth session); empty: the
    # factors above at any size
    factor_points: tuple[tuple[float, float, float], ...] = ()

    def factors_at(self, tokens: float) -> tuple[float, float]:
        """(attention, experts) factor for a part of `tokens` tokens: linear between the measured points, the
        nearest one's beyond them."""
        if not self.factor_points:
            return self.attention_factor, self.experts_factor
        import numpy as np
        sizes, attention, experts = zip(*self.factor_points)
        return float(np.interp(tokens, sizes, attention)), float(np.interp(tokens, sizes, experts))


@dataclass(frozen=True)
class Calibration:
    device: str  # where it was measured
    copy_bytes_per_s: float  # `bench layer`'s ceilings there: copy bandwidth (read + write) ...
    matmul_flops_per_s: float  # ... and bf16 (or the run's dtype) matmul
    datasheet_bytes_per_s: float | None  # the device's datasheet figures: ceilings / datasheet = the efficiency
    datasheet_flops_per_s: float | None  # carried to other GPU types (None: CPU, the ceilings are used as they are)
    attention: Linear  # the attention part of a layer at decode, µs against its floor in µs
    experts: Linear  # the fused MoE of a layer, µs against its floor in µs
    round: Linear  # one M2N round (dispatch + combine), µs against the bytes sent each way
    round_per_destination: bool  # message transports pay the overhead per expert node; lockstep rounds once
    round_link_bytes_per_s: float | None  # datasheet bandwidth of the link the rounds crossed (None: same process
    # host or device; the slope is then used as it is); other links scale the slope by their bandwidth
    step_overhead_us: float = 0.0  # host work per step outside the layers (scheduling, sampling, output) ...
    # ... plus this much per sequence in the step (step inputs, sampling, outputs are per sequence on the host)
    step_overhead_per_sequence_us: float = 0.0
    served: Served | None = None  # when measured: disaggregated rounds and parts as served (it replaces `round`)
    # the parts at prefill, eager, µs against their floor (`bench layer --prefill-tokens`); None: the decode lines
    prefill_attention: Linear | None = None
    prefill_experts: Linear | None = None
    # host time per MoE layer of a disaggregated GPU step that carries prompt tokens: it runs eagerly, its kernels
    # launched one by one, so it takes at least this per layer whatever its parts need (served.eager_layer_us from
    # a trace; 0: not measured, such steps are timed by their parts)
    eager_layer_us: float = 0.0
    # CPU the gateway (each process a serial stage beside the nodes) spends per output token it streams, and per
    # step message it takes, from a served run's /proc CPU seconds (served.gateway_costs); 0: not measured, no limit
    gateway_us_per_token: float = 0.0
    gateway_us_per_message: float = 0.0
    # the host path's latency per request, client to attention node and back (HTTP, the gateway, its socket to the
    # node), beyond its CPU: what a client's TTFT adds to the node's, and what a closed-loop run's batch slot stays
    # empty between a request's last token and its successor's arrival (perf.closed_loop); 0: not measured
    host_latency_us: float = 0.0
    # device time per step outside its layers' CUDA graph (the logits gathered and sampled over the vocabulary, the
    # token copied back, the next inputs copied in): a served step's launch interval less its graph's replay, from
    # a GPU timeline (benchmarks/gpu_timeline.py); 0: not measured
    step_outside_graph_us: float = 0.0
    # device time per layer that a graphed step carrying prompt chunks adds to its attention part, over the same
    # tokens as decodes: the prompts' causal attention, whose kernel time follows each prompt's length more than the
    # step's tokens (64-128-token prompts beside 256 decodes: +45 us a layer for Qwen3-30B-A3B's shape, +111 for
    # Mixtral's; gpu_timeline.mixed_attention_extra_us of a served trace); 0: not measured (shipped calibrations: it
    # differs by model shape). perf.graphed_step_us adds it, for closed_loop and predict alike.
    mixed_attention_extra_us: float = 0.0
    # the experts' kernel computes whole blocks of each expert's rows (the Triton fused MoE): their floor counts the
    # padding rows' flops (perf.padded_rows), as the line was fitted (fit_layer on bench layer's kernel_flops)
    experts_in_blocks: bool = False
    experts_math_rate: float = 1.0  # the experts kernel's math over the matmul ceiling (fit_experts)

    def step_host_us(self, sequences: float) -> float:
        """Host work of a step of `sequences` sequences outside its layers."""
        return self.step_overhead_us + self.step_overhead_per_sequence_us * sequences

    @property
    def bandwidth_efficiency(self) -> float:
        return self.copy_bytes_per_s / self.datasheet_bytes_per_s if self.datasheet_bytes_per_s else 1.0

    @property
    def flops_efficiency(self) -> float:
        return self.matmul_flops_per_s / self.datasheet_flops_per_s if self.datasheet_flops_per_s else 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        served = data.get("served")
        lines = {k: Linear(**data[k]) if data.get(k) else None
                 for k in ("attention", "experts", "round", "prefill_attention", "prefill_experts")}
        if served:
            served = Served(**{**served, "factor_points": tuple(map(tuple, served.get("factor_points", ())))})
        return cls(**{**data, **lines, "served": served or None})


def fit_line(points: list[tuple[float, float, float]]) -> Linear:
    """Least squares of y = a + b x + c tokens over (x, tokens, y) in relative error (small and large sizes count
    alike), every coefficient >= 0 (a negative cost would be a fitting artefact): the best fit over the subsets of
    terms whose coefficients come out non-negative."""
    import itertools

    import numpy as np
    if len(points) < 2:
        raise ConfigError(f"need at least 2 measurements to fit a line, got {len(points)}")
    data = np.array(points, dtype=np.float64)
    y = np.ones(len(data))
    columns = [1 / data[:, 2], data[:, 0] / data[:, 2], data[:, 1] / data[:, 2]]
    best = None
    for terms in (s for n in (3, 2, 1) for s in itertools.combinations(range(3), n)):
        coef, *_ = np.linalg.lstsq(np.stack([columns[t] for t in terms], 1), y, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(3)
        full[list(terms)] = coef
        error = float(((np.stack(columns, 1) @ full - y) ** 2).sum())
        if best is None or error < best[0] * (1 - 1e-9):
            best = (error, full)
    return Linear(*(float(f"{x:.6g}") for x in best[1]))


def kernel_floor_us(row: dict, bench_layer: dict, math_rate: float = 1.0) -> float:
    """A bench layer row's floor over the flops its kernel computes (kernel_flops: the Triton fused MoE's padding
    rows included; rows from before bench layer recorded them: their flops) at math_rate x the matmul ceiling."""
    flops = row.get("kernel_flops") or row["flops"]
    return max(row["bytes"] / bench_layer["copy_bytes_per_s"],
               flops / (bench_layer["matmul_flops_per_s"] * math_rate)) * 1e6


def fit_experts(layers: tuple[dict, ...], moe_backend: str) -> tuple[Linear, float]:
    """The experts' line over every experts row of `layers` (bench layer JSONs), and the rate of their kernel's math
    over the dense matmul ceiling: the one whose floors the line fits best. The Triton fused MoE on an H200 runs its
    math at 0.82 of a dense 8192^3 matmul's rate (Mixtral past its ridge; RESULTS.md, thirteenth session); where no
    row is bound by its math, every rate fits alike and 1 is kept."""
    rows = [(r, layer) for layer in layers for r in layer["rows"]
            if r["part"] == "experts" and r["backend"] == moe_backend]
    if not rows:
        raise ConfigError(f"bench layer JSON needs experts rows of backend {moe_backend!r}")
    best = None
    for rate in (1 - i / 100 for i in range(51)):
        points = [(kernel_floor_us(r, layer, rate), r["tokens"], r["us"]) for r, layer in rows]
        line = fit_line(points)
        error = sum((line(x, tokens) / y - 1) ** 2 for x, tokens, y in points)
        if best is None or error < best[0] * (1 - 1e-6):
            best = (error, line, round(rate, 2))
    return best[1], best[2]


def fit_layer(bench_layer: dict, moe_backend: str,
              more_experts: tuple[dict, ...] = ()) -> tuple[Linear, Linear, float]:
    """(attention, experts, the experts' math rate) from `bench layer --json` rows: time against floor, all shapes
    and sizes together (fit_experts). more_experts: other bench layer JSONs whose experts rows join the experts' fit
    (the experts timed on their own across more sizes)."""
    attention = [(r["floor_us"], r["tokens"], r["us"]) for r in bench_layer["rows"] if r["part"] == "attention"]
    if not attention:
        raise ConfigError("bench layer JSON needs attention rows")
    return (fit_line(attention), *fit_experts((bench_layer, *more_experts), moe_backend))


def fit_prefill(bench_layer: dict, moe_backend: str) -> tuple[Linear | None, Linear | None]:
    """(attention, experts) at prefill from `bench layer --prefill-tokens` rows (None where it has none): time
    against floor over the chunk sizes, the token term per chunk token."""
    rows = bench_layer["rows"]
    attention = [(r["floor_us"], r["tokens"], r["us"]) for r in rows if r["part"] == "prefill_attention"]
    experts = [(r["floor_us"], r["tokens"], r["us"]) for r in rows
               if r["part"] == "prefill_experts" and r["backend"] == moe_backend]
    return (fit_line(attention) if len(attention) >= 2 else None, fit_line(experts) if len(experts) >= 2 else None)


def fit_round(bench_transport: dict, backend: str) -> Linear:
    """The M2N round from `bench transport --json` m2n rows of one backend: µs against bytes sent each way."""
    rows = [(r["message_bytes"], r["tokens"], r["latency_us"]) for r in bench_transport["rows"]
            if r["pattern"] == "m2n" and r["backend"] == backend]
    if not rows:
        found = sorted({r["backend"] for r in bench_transport["rows"] if r["pattern"] == "m2n"})
        raise ConfigError(f"bench transport JSON has no m2n rows of backend {backend!r}; it has {found}")
    return fit_line(rows)


def from_benchmarks(device: str, layer_json: str | list[str], transport_json: str, moe_backend: str,
                    round_backend: str, datasheet_bytes_per_s: float | None = None,
                    datasheet_flops_per_s: float | None = None, round_link_bytes_per_s: float | None = None,
                    step_overhead_us: float = 0.0) -> Calibration:
    """layer_json: one bench layer JSON, or several: the first gives the ceilings, attention and prefill lines, and
    every one's experts rows join the experts' fit."""
    layer, *others = [json.loads(open(path).read()) for path in ([layer_json] if isinstance(layer_json, str)
                                                                  else layer_json)]
    attention, experts, math_rate = fit_layer(layer, moe_backend, tuple(others))
    prefill_attention, prefill_experts = fit_prefill(layer, moe_backend)
    return Calibration(device, layer["copy_bytes_per_s"], layer["matmul_flops_per_s"], datasheet_bytes_per_s,
                       datasheet_flops_per_s, attention, experts,
                       fit_round(json.loads(open(transport_json).read()), round_backend),
                       round_per_destination=not round_backend.startswith("lockstep"),
                       round_link_bytes_per_s=round_link_bytes_per_s, step_overhead_us=step_overhead_us,
                       prefill_attention=prefill_attention, prefill_experts=prefill_experts,
                       experts_in_blocks=moe_backend == "triton", experts_math_rate=math_rate)


def load(path: str) -> Calibration:
    """A calibration file: either a saved Calibration, or {device, bench_layer, bench_transport, moe_backend,
    round_backend, [datasheet_bytes_per_s, datasheet_flops_per_s, round_link_bytes_per_s, step_overhead_us,
    served]} naming the two JSONs (paths relative to the file). `served` adds what a served 1x1 run of a model
    measured (planner/served.py): {model: checkpoint dir, and either trace: `bench serve --trace` Chrome trace,
    [sweep: its microbatch_sweep JSON, for each node's CPU seconds], tokens, context (what it decoded),
    [host_traces: {sequences: trace} of the same run at other batch sizes: the host time per step as a line, and
    the parts' served factors at each size], or
    sweep: a served GPU row's microbatch_sweep JSON with GPU busy figures, [row: its index, default 0]: its host
    time per step gets served.GPU_STEP_HOST_PER_SEQUENCE_US a sequence, and its gateway CPU per token where the
    row has it; [eager_trace: a `bench serve --trace` of a GPU run: the host time per layer of its eager steps,
    eager_layer_us]}. A bench layer JSON with prefill rows (--prefill-tokens) gives the prefill lines. Either kind may
    add bench_gateway: a `bench gateway --json` file, the gateway's CPU per token and per message on this host."""
    data = read_structured(path)
    gateway = data.pop("bench_gateway", None)
    if "bench_layer" in data:  # a file, or a list of them (from_benchmarks)
        here = Path(path).parent
        layers = data["bench_layer"]
        cal = from_benchmarks(data["device"], [str(here / p) for p in layers] if isinstance(layers, list)
                              else str(here / layers), str(here / data["bench_transport"]),
                              data.get("moe_backend", "triton"), data.get("round_backend", "lockstep-ipc"),
                              data.get("datasheet_bytes_per_s"), data.get("datasheet_flops_per_s"),
                              data.get("round_link_bytes_per_s"), data.get("step_overhead_us", 0.0))
        cal = with_served(cal, data["served"], here) if data.get("served") else cal
    else:
        cal = Calibration.from_dict(data)
    if gateway:
        per_token, per_message = bench_gateway_costs(json.loads((Path(path).parent / gateway).read_text())["runs"])
        cal = dataclasses.replace(cal, gateway_us_per_token=per_token, gateway_us_per_message=per_message)
    return cal


def bench_gateway_costs(runs: list[dict]) -> tuple[float, float]:
    """(CPU µs a token, a step message) of the gateway from `bench gateway --json`'s runs: their median."""
    if not runs:
        raise ConfigError("a bench gateway JSON without runs")
    return statistics.median(r["us_per_token"] for r in runs), statistics.median(r["us_per_message"] for r in runs)


def with_served(cal: Calibration, served_run: dict, here: Path) -> Calibration:
    """cal with a served run's terms (load's `served` entry): from a CPU phase trace, or from a GPU row's meters."""
    from ..model.spec import ModelSpec
    from . import served
    from .gpus import GpuType
    from .perf import Deployment, ModelCosts, comm_us
    unknown = set(served_run) - {"model", "trace", "sweep", "row", "tokens", "context", "dtype_bytes", "host_traces",
                                 "eager_trace"}
    if unknown or "model" not in served_run or not ({"trace", "sweep"} & set(served_run)):
        raise ConfigError(f"calibration `served` entry {served_run}: give model and trace or sweep "
                          f"(unknown keys: {sorted(unknown)})")
    spec = ModelSpec.from_dir(str(here / served_run["model"]))
    device = GpuType(cal.device, 0, (cal.datasheet_bytes_per_s or cal.copy_bytes_per_s) / 1e12,
                     (cal.datasheet_flops_per_s or cal.matmul_flops_per_s) / 1e12,
                     (cal.round_link_bytes_per_s or 0.0) / 1e9, 0)
    sweep = json.loads((here / served_run["sweep"]).read_text()) if "sweep" in served_run else None
    dtype_bytes = served_run.get("dtype_bytes", 2)
    if "trace" in served_run:
        cpu_s = sweep["rows"][served_run.get("row", 0)].get("cpu_s") if sweep else None
        phases = served.phases_of(json.loads((here / served_run["trace"]).read_text()), cpu_s)
        others = {int(n): served.phases_of(json.loads((here / trace).read_text()))
                  for n, trace in (served_run.get("host_traces") or {}).items()}
        return served.served_calibration(cal, phases, spec, device, served_run["tokens"], served_run["context"],
                                         dtype_bytes, other_batches=others)
    index, args = served_run.get("row", 0), sweep["args"]
    m = sweep["rows"][index]["microbatches"]
    crossing = comm_us(ModelCosts(spec, dtype_bytes), Deployment(device, device, 1, 1, m, 1, 0), cal,
                       args["concurrency"] / m)
    phases, tokens = served.gpu_phases_of(sweep, index, spec, crossing)
    context = sum(args["input_len"]) / 2 + sum(args["output_len"]) / 4  # mid-output, mean lengths
    fitted = served.served_calibration(cal, phases, spec, device, tokens, context, dtype_bytes, additive=True)
    sequences = tokens * (m if args["expert_nodes"] else 1)  # a step's, on the node measured
    eager = served.eager_layer_us(json.loads((here / served_run["eager_trace"]).read_text()),
                                  ModelCosts(spec, dtype_bytes).moe_layers) if "eager_trace" in served_run else 0.0
    per_token, per_message = served.gateway_costs(args, sweep["rows"][index])
    return dataclasses.replace(served.with_host_per_sequence(fitted, sequences), gateway_us_per_token=per_token,
                               gateway_us_per_message=per_message, eager_layer_us=eager)


# Shipped: one H200 (benchmarks/RESULTS.md). Parts: `bench layer` second run (benchmarks/gpu_dataplane/
# bench_layer_2.json, Triton fused MoE), its experts joined by the experts alone from 1 to 2048 tokens (benchmarks/
# gpu_multi/session13/call3/experts_alone.json): attention rows within 9% of their line, experts within 16% (the
# worst at Mixtral's 512 tokens, where half its experts spill into a second block), their math at 0.82 of the
# matmul ceiling. Round: the lockstep M2N over CUDA IPC between two H200s over NVLink (benchmarks/gpu_multi/
# bench_ipc.json, 41-55 us at 1-256 tokens). Step overhead: the colocated Qwen3-30B-A3B-shape row served on one H200
# (benchmarks/gpu_lockstep/precapture), its TPOT p50 less what the parts predict for it (benchmarks/
# plan_validation.py; the only figure fitted to a served run). Gateway: the CPU per streamed token and per step
# message of the gateway processes of served rows on an H200's host (served.gateway_costs over the seventeenth
# session's one-client rows, plan_validation.GATEWAY_ROWS, the median per token; `python benchmarks/plan_validation.py
# --gpu-rows` prints it), for sizing the gateway (perf.gateway_workers).
H200 = Calibration(
    device="H200", copy_bytes_per_s=4.0869e12, matmul_flops_per_s=7.47503e14, datasheet_bytes_per_s=4.8e12,
    datasheet_flops_per_s=9.89e14, attention=Linear(61.5547, 0.937344, 0.0107483),
    experts=Linear(16.501, 0.978335, 0.087514), experts_in_blocks=True, experts_math_rate=0.82,
    round=Linear(40.2539, 6.83384e-06, 8.34209e-10), round_per_destination=False, round_link_bytes_per_s=4.5e11,
    step_overhead_us=0.0, gateway_us_per_token=44.5, gateway_us_per_message=235.0)
