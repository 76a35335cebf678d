"""What a served run costs that `bench layer` and `bench transport` do not see, read from the phase trace of
`bench serve --trace` on a 1 attention + 1 expert node cluster at m = 1 decoding a known batch (and each node's CPU
seconds over it): the M2N round as the nodes pay it, the parts' served time against their bench time, and the host
work per step."""
from __future__ import annotations

import bisect
import dataclasses
import statistics
from dataclasses import dataclass

from ..config import ConfigError
from ..model.spec import ModelSpec
from .calibration import Calibration, Served, fit_line
from .gpus import GpuType
from .perf import Deployment, ModelCosts, _floor_us, attention_us, experts_us, moe_layers_us


@dataclass(frozen=True)
class ServedPhases:
    """Medians over the decode steps of a traced 1x1, m = 1 run (µs)."""
    attention_segment_us: float  # the attention node's work between two MoE layers' rounds
    expert_compute_us: float  # the expert node's compute of one layer
    dispatch_us: float  # attention node: building and sending the Dispatch ...
    combine_us: float  # ... and adding up its answer
    answer_us: float  # expert node: sending the Combine
    crossing_us: float  # one way: half of what a round costs beyond the compute and the host work
    step_host_us: float  # per step outside the layers: step inputs, final norm and lm_head, sampling, between steps
    attention_background_us: float = 0.0  # per round, the node's CPU outside its phases (its transport's threads,
    expert_background_us: float = 0.0  # the event loop); 0 without CPU seconds
    slower_of_two_us: float = 0.0  # a round that waits for the slower of two, over the median (slower_of_two_us)


# An attention node's host work between steps, traced as phases of their own since the tenth session: here, as
# before, the time between a step's last phase and the next step's first (step_host_us)
BETWEEN_STEPS = ("schedule", "settle")


def _node_events(trace: dict) -> dict[str, list[tuple[float, float, str]]]:
    """Each traced node's host phases, (start µs, duration µs, phase) in time order, by the node's name (its
    GPU's spans, the rows "<node> GPU", and the work between steps left out)."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    nodes: dict[str, list[tuple[float, float, str]]] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X" and not names[e["pid"]].endswith(" GPU") and e["name"] not in BETWEEN_STEPS:
            nodes.setdefault(names[e["pid"]], []).append((e["ts"], e["dur"], e["name"]))
    return {node: sorted(events) for node, events in nodes.items()}


def eager_layer_us(trace: dict, moe_layers: int, node: str = "attention node 0") -> float:
    """Host time per MoE layer of the steps a traced attention node ran eagerly, median over them: all their phases
    but sampling, over the layers. Eager steps are those with dispatch phases: on a GPU, the steps that carry
    prompt tokens (decode-only steps replay whole-step graphs, one phase each). A step starts at the first
    "attention" after a "sample" (async scheduling samples twice a step: at launch and when its tokens land)."""
    steps, step, previous = [], [], None
    for e in _node_events(trace).get(node, []):
        if e[2] == "attention" and previous == "sample" and step:
            steps.append(step)
            step = []
        step.append(e)
        previous = e[2]
    eager = [sum(d for _, d, name in s if name != "sample") / moe_layers for s in steps + [step]
             if any(name == "dispatch" for _, _, name in s)]
    if not eager:
        raise ConfigError(f"no eager steps (with dispatch phases) of {node} in the trace")
    return statistics.median(eager)


def phases_of(trace: dict, cpu_s: dict[str, float] | None = None) -> ServedPhases:
    """ServedPhases from a Chrome trace (telemetry.chrome_trace) of one attention and one expert node at m = 1, and
    the CPU seconds each node used over the same run ({"attention node 0": s, "expert node 0": s})."""
    nodes = _node_events(trace)
    if sorted(nodes) != ["attention node 0", "expert node 0"]:
        raise ConfigError(f"a served calibration needs the trace of 1 attention and 1 expert node, got {sorted(nodes)}")
    attention, expert = (nodes[n] for n in ("attention node 0", "expert node 0"))
    of = lambda events, name: [e for e in events if e[2] == name]  # noqa: E731
    dispatch, combine = of(attention, "dispatch"), of(attention, "combine")
    compute, answer = of(expert, "expert_compute"), of(expert, "combine_send")
    if not dispatch or not compute:
        raise ConfigError(f"no served rounds in the trace: {len(dispatch)} dispatches, {len(compute)} expert computes")
    end = lambda e: e[0] + e[1]  # noqa: E731
    # a round: a dispatch, the expert compute that starts next, the combine that starts after that (the nodes'
    # clocks are the host's); its time apart from the compute is what the M2N costs as served
    computes = dict(_next_after(dispatch, compute))
    combines = dict(_next_after(list(computes.values()), combine))
    rounds = [end(combines[c]) - d[0] - c[1] for d, c in computes.items() if c in combines]
    # a step: step inputs, a segment before each round, the last segment (final norm, lm_head), then "sample"
    steps, step = [], []
    for e in attention:
        step.append(e)
        if e[2] == "sample":
            steps.append(step)
            step = []
    segments, step_host = [], []
    for i, step in enumerate(steps):
        segments += [e[1] for e, after in zip(step, step[1:]) if e[2] == "attention" and after[2] == "dispatch"]
        if i + 1 < len(steps) and len(step) >= 3:  # not a step the trace's start cut (a lone "sample")
            between = steps[i + 1][0][0] - end(step[-1])
            step_host.append(step[0][1] + step[-2][1] + step[-1][1] + between)
    med = statistics.median
    # host phases are work once the loop's thread no longer waits for the GIL in them (process.SWITCH_INTERVAL_S)
    work = [med(e[1] for e in events) for events in (dispatch, combine, answer)]
    background = [max(0.0, (cpu_s[node] * 1e6 - sum(e[1] for e in nodes[node])) / len(rounds)) if cpu_s else 0.0
                  for node in ("attention node 0", "expert node 0")]
    return ServedPhases(med(segments), med(c[1] for c in compute), *work, max(0.0, (med(rounds) - sum(work)) / 2),
                        med(step_host), *background, slower_of_two_us(rounds))


def slower_of_two_us(rounds: list[float]) -> float:
    """The mean of the larger of two rounds drawn from `rounds`, less their median: what a round that waits for two
    expert nodes adds over one, where each node's share of the round varies as a whole round did (the 1+1 traces
    of the CPU rows: 0.40-0.50 ms over a 2.4-2.6 ms median; RESULTS.md, fifteenth session). Exact over the
    empirical distribution: the i-th smallest of n is the larger of two with chance (i² - (i-1)²) / n²."""
    ordered, n = sorted(rounds), len(rounds)
    return sum(x * (2 * i - 1) for i, x in enumerate(ordered, 1)) / n ** 2 - statistics.median(ordered)


def _next_after(sends: list, receives: list) -> list[tuple]:
    """(send, the first receive that starts after the send started) for each send that some receive follows."""
    starts = [r[0] for r in receives]
    pairs = []
    for send in sends:
        i = bisect.bisect_left(starts, send[0])
        if i < len(receives):
            pairs.append((send, receives[i]))
    return pairs


# Host time per step per sequence where only one batch size was served (the GPU rows): the Python parts of a step
# (its inputs, sampling, the wait until the next) grew by about 15 µs per sequence from 4 to 32 sequences in the CPU
# traces of benchmarks/planner/prefill (*_served_c4/_c32 beside *_served: 0.77-0.84 ms at 4, 1.18-1.41 ms at 32;
# RESULTS.md, issue 14). Not measured on a GPU host, whose cores may be faster; the fixed part is what the served
# row leaves at its own batch.
GPU_STEP_HOST_PER_SEQUENCE_US = 15.0


def with_host_per_sequence(cal: Calibration, sequences: float,
                           per_sequence_us: float = GPU_STEP_HOST_PER_SEQUENCE_US) -> Calibration:
    """cal's host time per step, measured at `sequences` a step, as a line with per_sequence_us a sequence."""
    fixed_us = max(0.0, cal.step_host_us(sequences) - per_sequence_us * sequences)
    return dataclasses.replace(cal, step_overhead_us=fixed_us, step_overhead_per_sequence_us=per_sequence_us)


def step_host_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed µs, µs per sequence) of the host work per step from (sequences decoding, host µs per step) pairs:
    traced runs at two or more batch sizes; least squares in relative error, neither part negative."""
    if len({sequences for sequences, _ in points}) < 2:
        raise ConfigError(f"a line of host time per step needs runs at 2 batch sizes or more, got {points}")
    line = fit_line([(sequences, 0.0, host_us) for sequences, host_us in points])
    return line.overhead_us, line.slope


def served_calibration(cal: Calibration, phases: ServedPhases, spec: ModelSpec, device: GpuType, tokens: int,
                       context: float, dtype_bytes: int,
                       other_batches: dict[int, ServedPhases] | None = None, additive: bool = False) -> Calibration:
    """`cal` with what serving adds (phases measured at `tokens` sequences decoding at `context`): the served round,
    the parts' served time over their bench time (additive: their time beyond it, as a GPU's served spans are), and
    the host work per step; with traced runs at other batch sizes (other_batches: sequences -> their phases), the
    factors at each (Served.factor_points) and the host work as a line in the sequences of a step."""
    costs = ModelCosts(spec, dtype_bytes)
    layers_per_segment = spec.num_layers / costs.moe_layers

    def bench(n: int) -> tuple[float, float]:
        """bench layer's attention segment and experts at n tokens."""
        return (layers_per_segment * attention_us(costs, device, cal, n, context),
                experts_us(costs, device, cal, n, spec.num_experts))

    def factors(n: int, p: ServedPhases) -> tuple[float, float]:
        """The parts' served time over their bench time at n tokens."""
        attention, experts = bench(n)
        return p.attention_segment_us / attention, p.expert_compute_us / experts

    lm_head = _floor_us(costs.elt * spec.vocab_size * spec.hidden_size, 2 * tokens * spec.vocab_size *
                        spec.hidden_size, device, cal)  # the model adds it on its own
    if additive:
        bench_attention, bench_experts = bench(tokens)
        parts = (1.0, 1.0, (phases.attention_segment_us - bench_attention) / layers_per_segment,
                 phases.expert_compute_us - bench_experts)
    else:
        parts = (*factors(tokens, phases), 0.0, 0.0)
    factor_points = () if additive or not other_batches else tuple(
        (n, *factors(n, p)) for n, p in sorted({**other_batches, tokens: phases}.items()))
    served = Served(phases.dispatch_us + phases.combine_us, phases.answer_us, phases.crossing_us,
                    phases.attention_background_us, phases.expert_background_us, *parts,
                    slower_of_two_us=phases.slower_of_two_us, factor_points=factor_points)
    if not other_batches:
        return dataclasses.replace(cal, served=served, step_overhead_us=max(0.0, phases.step_host_us - lm_head))
    points = [(n, p.step_host_us - _floor_us(costs.elt * spec.vocab_size * spec.hidden_size,
                                             2 * n * spec.vocab_size * spec.hidden_size, device, cal))
              for n, p in {**other_batches, tokens: phases}.items()]
    fixed_us, per_sequence_us = step_host_line(points)
    return dataclasses.replace(cal, served=served, step_overhead_us=fixed_us,
                               step_overhead_per_sequence_us=per_sequence_us)


def gpu_phases_of(run: dict, index: int, spec: ModelSpec, crossing_us: float) -> tuple[ServedPhases, float]:
    """ServedPhases of a served GPU row (`microbatch_sweep.py` JSON: each node's GPU busy fraction of the run and
    device ms per span, telemetry.GpuMeter), and the decode tokens per microbatch its steps carried on average.
    A 1+1 row's spans are the attention node's segments (m·(layers + 1) a step) and the expert node's computes
    (m·layers a step), so the expert meter counts the steps; what a step takes beyond its MoE layers (moe_layers_us
    of the measured spans, `crossing_us` one way, as the model times them) is host work between steps (inputs,
    sampling, outputs, the step's plan to the expert node). A colocated row's node has one span a step: the rest of
    its step is host work."""
    args, row = run["args"], run["rows"][index]
    busy, span_ms = row.get("gpu_busy") or {}, row.get("gpu_span_ms") or {}
    m, layers, wall_s = row["microbatches"], ModelCosts(spec).moe_layers, row["duration_s"]
    if args["expert_nodes"] == 0:
        node = "attention_node_0"
        if node not in busy:
            raise ConfigError(f"row {index} has no GPU busy figure for {node}: {sorted(busy)}")
        steps = busy[node] * wall_s / (span_ms[node] / 1e3)
        phases = ServedPhases(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, (wall_s / steps - span_ms[node] / 1e3) * 1e6)
        return phases, row["output_tokens"] / args["attention_nodes"] / steps
    if (args["attention_nodes"], args["expert_nodes"]) != (1, 1) or \
            not {"attention_node_0", "expert_node_0"} <= set(busy):
        raise ConfigError(f"a served GPU calibration needs a 1+1 row with both nodes' GPU busy figures; row {index} "
                          f"is {args['attention_nodes']}+{args['expert_nodes']} with {sorted(busy)}")
    t_a, t_e = span_ms["attention_node_0"] * 1e3, span_ms["expert_node_0"] * 1e3
    steps = busy["expert_node_0"] * wall_s / (t_e / 1e6 * m * layers)
    gpu = GpuType("served", 0, 0, 0, 0, 0)
    device = moe_layers_us(t_a, t_e, crossing_us, m, layers, Deployment(gpu, gpu, 1, 1, m, 1, 0))
    host = wall_s / steps * 1e6 - device
    return ServedPhases(t_a, t_e, 0.0, 0.0, 0.0, crossing_us, max(0.0, host)), row["output_tokens"] / steps / m


# The gateway's CPU per StepOutputs message it takes (each attention node's step sends one to each gateway process
# with requests in it), beside its CPU per output token: a least-squares fit in relative error over the 25 served
# rows of 2 x H200 with steps_per_node (sessions 9 and 10, 4 gateway processes, 27-225 tokens a step and node):
# 235 µs a message and 77 µs a token; every 64-in-flight row within 8%, the colocated rows at 256 in flight +12%
# and +17%, the worst +39% (one figure a token, 87 µs: the worst +50%; RESULTS.md, tenth session). A row read at
# 64 in flight so extrapolates to 256: its messages carry 2-4 times fewer tokens there.
GATEWAY_US_PER_MESSAGE = 235.0


def gateway_costs(args: dict, row: dict, per_message_us: float = GATEWAY_US_PER_MESSAGE) -> tuple[float, float]:
    """(CPU µs per output token, per message) of the gateway over a served row (`microbatch_sweep.py` JSON with
    cpu_s): per_message_us a message and the rest by token, where the row counts its steps (steps_per_node); else
    all of it by token. (0, 0) without cpu_s."""
    cpu_s = {name: s for name, s in (row.get("cpu_s") or {}).items() if name.split(" ")[0] == "gateway"}  # workers
    if not cpu_s or not row["output_tokens"]:
        return 0.0, 0.0
    steps = sum(node[0] for node in (row.get("steps_per_node") or {}).values())
    messages = steps * (args.get("gateway_workers") or 1) if steps else 0
    per_message = per_message_us if messages else 0.0
    return max(0.0, sum(cpu_s.values()) * 1e6 - messages * per_message) / row["output_tokens"], per_message
