"""The served calibration (planner/served.py): phases read from a phase trace built by hand, and the model using
them: disaggregated parts at their served time, the round's host work added to T_a and T_e, only the crossing as
T_c, each node's background CPU keeping it busy off the round trip; colocated nodes as bench layer times them."""
from __future__ import annotations

import dataclasses

import pytest

from expertmesh.config import ConfigError
from expertmesh.model.shapes import shape
from expertmesh.planner import calibration
from expertmesh.planner.gpus import GpuType
from expertmesh.planner.perf import (Deployment, ModelCosts, _floor_us, attention_us, comm_us, experts_us, fanout,
                                     layer_us, step_parts)
from expertmesh.planner.served import ServedPhases, phases_of, served_calibration
from expertmesh.telemetry import chrome_trace

CPU = GpuType("cpu", 64, 0.012, 0.17, 0, 0)
LINE = calibration.Linear(100.0, 1.5, 20.0)
CAL = calibration.Calibration("cpu", 1.2e10, 1.7e11, None, None, LINE, LINE, calibration.Linear(550.0, 0.0, 1.0),
                              True, None)


def served_trace(steps: int = 3) -> dict:
    """1x1, m = 1, one MoE layer per step, in µs: step inputs 100, segment 1000, dispatch 300, crossing 250, expert
    compute 2000, answer 100, crossing 250, combine 50, last segment 400, sample 200, 350 until the next step."""
    attention, expert = [], []
    for k in range(steps):
        t = 5000 * k
        attention += [["attention", t, 100, 0], ["attention", t + 100, 1000, 0], ["dispatch", t + 1100, 300, 0]]
        expert += [["expert_compute", t + 1650, 2000, 0], ["combine_send", t + 3650, 100, 0]]
        attention += [["combine", t + 4000, 50, 0], ["attention", t + 4050, 400, 0], ["sample", t + 4450, 200, 0]]
    return chrome_trace({"attention node 0": attention, "expert node 0": expert})


def test_phases_of_a_trace_built_by_hand():
    # each node's CPU beyond its phases over the 3 rounds: 500 and 200 µs a round
    cpu_s = {"attention node 0": 3 * (2050 + 500) / 1e6, "expert node 0": 3 * (2100 + 200) / 1e6}
    phases = phases_of(served_trace(), cpu_s)
    # round: combine's end - dispatch's start - compute = 2950 - 2000; less host work 300 + 50 + 100, halved
    assert phases == ServedPhases(attention_segment_us=1000, expert_compute_us=2000, dispatch_us=300, combine_us=50,
                                  answer_us=100, crossing_us=250, step_host_us=100 + 400 + 200 + 350,
                                  attention_background_us=pytest.approx(500), expert_background_us=pytest.approx(200))
    assert phases_of(served_trace()).attention_background_us == 0  # no CPU seconds: none counted


def test_a_step_cut_by_the_traces_start_is_left_out():
    """A trace started during a step's sampling opens with a lone "sample": not a step of its own."""
    trace = served_trace(steps=4)
    cut = chrome_trace({"attention node 0": [["sample", -300, 200, 0]], "expert node 0": []})["traceEvents"]
    trace["traceEvents"] += [e for e in cut if e.get("ph") == "X"]
    assert phases_of(trace).step_host_us == 100 + 400 + 200 + 350


def test_the_host_work_between_steps_stays_between_steps():
    """The attention node traces its scheduler and the settling of each step's tokens as phases ("schedule",
    "settle"): they are the work between two steps, which the phases read as such."""
    trace = served_trace()
    pid = next(e["pid"] for e in trace["traceEvents"] if e["ph"] == "M" and e["args"]["name"] == "attention node 0")
    for k in range(3):
        trace["traceEvents"] += [{"name": "settle", "ph": "X", "pid": pid, "tid": 0, "ts": 5000 * k + 4650, "dur": 150},
                                 {"name": "schedule", "ph": "X", "pid": pid, "tid": 0, "ts": 5000 * k + 4820,
                                  "dur": 100}]
    assert phases_of(trace) == phases_of(served_trace())


def test_the_gpu_rows_of_a_trace_are_not_nodes():
    """A GPU run's trace has a row of device spans beside each node (telemetry.GpuMeter.timeline): not a node's
    host phases."""
    trace = served_trace()
    gpu = chrome_trace({}, {"attention node 0": [["segment 0", 100, 900, 0]],
                            "expert node 0": [["experts, layer 0", 1700, 1900, 0]]})["traceEvents"]
    offset = 1 + max(e["pid"] for e in trace["traceEvents"])
    trace["traceEvents"] += [{**e, "pid": e["pid"] + offset} for e in gpu]
    assert phases_of(trace) == phases_of(served_trace())


def test_a_trace_has_a_gpu_row_beside_each_node_with_gpu_spans():
    trace = chrome_trace({"attention node 0": [["attention", 0, 10, 0]], "expert node 0": []},
                         {"attention node 0": [["segment 0", 2, 5, 1]], "expert node 0": []})
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert sorted(names.values()) == ["attention node 0", "attention node 0 GPU", "expert node 0"]
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X" and names[e["pid"]] == "attention node 0 GPU"]
    assert [(e["name"], e["ts"], e["dur"], e["tid"]) for e in spans] == [("segment 0", 2, 5, 1)]


def test_phases_need_one_attention_and_one_expert_node():
    trace = served_trace()
    trace["traceEvents"][0]["args"]["name"] = "attention node 1"
    with pytest.raises(ConfigError, match="1 attention and 1 expert node"):
        phases_of(trace)


def test_the_model_runs_disaggregated_parts_and_rounds_as_served():
    spec = shape("tiny")[1]  # every layer MoE: a segment is one layer's attention part
    costs = ModelCosts(spec, 4)
    phases = dataclasses.replace(phases_of(served_trace()), attention_background_us=500, expert_background_us=200)
    cal = served_calibration(CAL, phases, spec, CPU, tokens=16, context=48, dtype_bytes=4)
    served = cal.served
    assert attention_us(costs, CPU, CAL, 16, 48) * served.attention_factor == pytest.approx(1000)
    assert experts_us(costs, CPU, CAL, 16, spec.num_experts) * served.experts_factor == pytest.approx(2000)
    lm_head = _floor_us(4 * spec.vocab_size * spec.hidden_size, 2 * 16 * spec.vocab_size * spec.hidden_size, CPU, CAL)
    assert cal.step_overhead_us == pytest.approx(1050 - lm_head)
    assert (served.dispatch_us, served.answer_us, served.crossing_us) == (350, 100, 250)
    assert calibration.Calibration.from_dict(cal.to_dict()) == cal

    plan = Deployment(CPU, CPU, 1, 2, 2, 32, 128)  # 1 attention node, 2 expert nodes, 2 microbatches of 16
    t_a, t_e, t_c, step = step_parts(costs, plan, cal, 32, 48, 2)
    reached = 1 - (1 - fanout(spec, 2) / 2) ** 16  # chance that a microbatch of 16 tokens sends a node anything
    assert t_c == 250  # only the crossing: latency the other microbatch can hide
    assert t_a == pytest.approx(attention_us(costs, CPU, CAL, 16, 48) * served.attention_factor + 2 * reached * 350)
    assert t_e == pytest.approx(experts_us(costs, CPU, CAL, 16, 8) * served.experts_factor + reached * 100)
    assert comm_us(costs, plan, dataclasses.replace(cal, served=None), 16) > 250  # the echo round without it
    # the background CPU keeps each node busy (2 microbatches x (T + background)), off the round trip
    layer = max(2 * (t_a + 2 * reached * 500), 2 * (t_e + reached * 200), t_a + t_e + 500)
    assert layer_us(t_a, t_e, t_c, 2, plan, (2 * reached * 500, reached * 200)) == pytest.approx(layer)
    lm_head_32 = _floor_us(4 * spec.vocab_size * spec.hidden_size, 2 * 32 * spec.vocab_size * spec.hidden_size, CPU,
                           CAL)
    # each step fills and drains the pipeline: one microbatch's round trip beyond the busiest node's round
    t_f = max(t_a + 2 * reached * 500, t_e + reached * 200)
    pipeline = costs.moe_layers * 2 * t_f + max(0.0, t_a + t_e + 500 - t_f)
    assert pipeline > costs.moe_layers * layer  # this plan's nodes are busy enough that the fill shows
    assert step == pytest.approx(pipeline + lm_head_32 + cal.step_overhead_us)


def test_parts_traced_at_several_batch_sizes_are_served_as_traced_at_each():
    """The CPU rows' experts took 1.35x bench layer at 16 tokens and 0.87x at 32: one factor from 16 scaled the
    32-token rows' experts a third too high (RESULTS.md, seventeenth session). With traces at 4, 16 and 32 tokens
    each size gets its own factor, and the sizes between them a factor between theirs."""
    spec = shape("tiny")[1]  # every layer MoE: a segment is one layer's attention part
    costs = ModelCosts(spec, 4)
    traced = {4: (600.0, 1500.0), 16: (1000.0, 2000.0), 32: (1400.0, 1800.0)}  # tokens: (segment, expert compute)
    phases = {n: dataclasses.replace(phases_of(served_trace()), attention_segment_us=a, expert_compute_us=e)
              for n, (a, e) in traced.items()}
    cal = served_calibration(CAL, phases[16], spec, CPU, tokens=16, context=48, dtype_bytes=4,
                             other_batches={4: phases[4], 32: phases[32]})
    served = cal.served
    assert [n for n, *_ in served.factor_points] == [4, 16, 32]
    plan = Deployment(CPU, CPU, 1, 1, 1, 64, 0)
    for n, (segment, compute) in traced.items():
        t_a, t_e, _, _ = step_parts(costs, plan, cal, n, 48, 1)
        reached = 1 - (1 - fanout(spec, 1)) ** n
        assert t_a - reached * served.dispatch_us == pytest.approx(segment)
        assert t_e - reached * served.answer_us == pytest.approx(compute)
    # between two traced sizes, between their factors; beyond them, the nearest one's
    (_, a16, e16), (_, a32, e32) = served.factor_points[1:]
    assert served.factors_at(24) == pytest.approx(((a16 + a32) / 2, (e16 + e32) / 2))
    assert served.factors_at(64) == (a32, e32) and served.factors_at(1) == served.factor_points[0][1:]
    # one traced size: its factor at every size, as before
    single = served_calibration(CAL, phases[16], spec, CPU, tokens=16, context=48, dtype_bytes=4).served
    assert single.factor_points == () and single.factors_at(32) == (single.attention_factor, single.experts_factor)
    assert calibration.Calibration.from_dict(cal.to_dict()) == cal


def test_colocated_nodes_keep_their_bench_parts():
    spec = shape("tiny")[1]
    costs = ModelCosts(spec, 4)
    cal = served_calibration(CAL, phases_of(served_trace()), spec, CPU, tokens=16, context=48, dtype_bytes=4)
    colocated = Deployment(CPU, None, 1, 0, 1, 32, 128)
    with_served, without = (step_parts(costs, colocated, c, 16, 48, 1) for c in (cal, dataclasses.replace(
        cal, served=None)))
    assert with_served == without  # one process runs its parts back to back, as bench layer times them


def test_a_disaggregated_step_fills_and_drains_its_pipeline():
    from expertmesh.planner.perf import pipeline_us
    plan = Deployment(CPU, CPU, 1, 1, 3, 64, 0)
    # expert-bound: 8 layers x 3 rounds of T_e 178, plus one round trip less T_e (T_a 117 + 2 x 20)
    assert pipeline_us(117, 178, 20, 3, 8, plan) == pytest.approx(8 * 3 * 178 + 117 + 40)
    # the round trip sets each layer at m = 1: the pipeline is never longer than that
    assert pipeline_us(100, 80, 50, 1, 4, plan) <= 4 * layer_us(100, 80, 50, 1, plan)
    assert pipeline_us(117, 178, 20, 3, 8, Deployment(CPU, None, 2, 0, 1, 32, 0)) == 0.0  # colocated: no pipeline
    costs = ModelCosts(shape("qwen3")[1])
    gpu = dataclasses.replace(CPU, hbm_tb_s=4.8, bf16_tflops=989)
    t_a, t_e, t_c, step = step_parts(costs, Deployment(gpu, gpu, 1, 1, 3, 64, 0), CAL, 64, 144, 3)
    lm_head = _floor_us(costs.elt * costs.spec.vocab_size * costs.spec.hidden_size,
                        2 * 64 * costs.spec.vocab_size * costs.spec.hidden_size, gpu, CAL)
    moe = costs.moe_layers * layer_us(t_a, t_e, t_c, 3, Deployment(gpu, gpu, 1, 1, 3, 64, 0))
    assert step - lm_head == pytest.approx(max(moe, costs.moe_layers * 3 * max(t_a, t_e) + t_a + t_e + 2 * t_c -
                                               max(t_a, t_e)))


def gpu_row(expert_nodes: int, m: int, busy: dict, span_ms: dict, wall_s: float, tokens: int) -> dict:
    args = {"attention_nodes": 1 if expert_nodes else 2, "expert_nodes": expert_nodes, "max_num_seqs": 64}
    return {"args": args, "rows": [{"microbatches": m, "duration_s": wall_s, "output_tokens": tokens,
                                    "gpu_busy": busy, "gpu_span_ms": span_ms}]}


def test_gpu_phases_of_a_served_row_built_by_hand():
    from expertmesh.planner.served import gpu_phases_of
    spec = shape("qwen3")[1]
    layers = ModelCosts(spec).moe_layers
    # 100 steps of 2 microbatches: T_a 0.1 ms, T_e 0.2 ms, crossing 20 us; each step 3 ms beyond its pipeline
    pipeline_ms = layers * 2 * 0.2 + 0.1 + 0.04
    wall_ms = 100 * (pipeline_ms + 3.0)
    busy = {"attention_node_0": 100 * 2 * (layers + 1) * 0.1 / wall_ms, "expert_node_0": 100 * 2 * layers * 0.2 / wall_ms}
    run = gpu_row(1, 2, busy, {"attention_node_0": 0.1, "expert_node_0": 0.2}, wall_ms / 1e3, 6400)
    phases, tokens = gpu_phases_of(run, 0, spec, 20.0)
    assert (phases.attention_segment_us, phases.expert_compute_us) == pytest.approx((100, 200))
    assert phases.step_host_us == pytest.approx(3000)
    assert phases.crossing_us == 20.0 and tokens == pytest.approx(32)
    # m = 1: no layer overlaps the next, so the layers take layers x (T_a + T_e + 2 crossings) (moe_layers_us, as
    # the model times a step), not the pipeline of two microbatches' rounds: the same 3 ms beyond them
    layers_ms = layers * (0.1 + 0.2 + 0.04)
    wall_ms = 100 * (layers_ms + 3.0)
    busy = {"attention_node_0": 100 * (layers + 1) * 0.1 / wall_ms, "expert_node_0": 100 * layers * 0.2 / wall_ms}
    run = gpu_row(1, 1, busy, {"attention_node_0": 0.1, "expert_node_0": 0.2}, wall_ms / 1e3, 6400)
    phases, tokens = gpu_phases_of(run, 0, spec, 20.0)
    assert phases.step_host_us == pytest.approx(3000) and tokens == pytest.approx(64)
    # colocated: one span a step (2.5 ms), 4 ms a step
    run = gpu_row(0, 1, {"attention_node_0": 2.5 / 4}, {"attention_node_0": 2.5}, 0.4, 3200)
    phases, tokens = gpu_phases_of(run, 0, spec, 0.0)
    assert phases.step_host_us == pytest.approx(1500) and tokens == pytest.approx(16)
    with pytest.raises(ConfigError, match="both nodes' GPU busy"):
        gpu_phases_of(gpu_row(1, 2, {"expert_node_0": 0.5}, {"expert_node_0": 0.2}, 1.0, 100), 0, spec, 20.0)


def test_a_calibration_file_takes_a_served_gpu_row(tmp_path):
    import json
    from pathlib import Path

    from expertmesh.model.make_model import RandomModelShape, hf_config
    from expertmesh.model.spec import ModelSpec
    from expertmesh.planner.served import gpu_phases_of
    benchmarks = Path(__file__).resolve().parents[2] / "benchmarks"
    (tmp_path / "model").mkdir()
    config = hf_config(RandomModelShape(arch="qwen3_moe", num_layers=2), 1, 2)
    (tmp_path / "model/config.json").write_text(json.dumps(config))
    spec = ModelSpec.from_dir(tmp_path / "model")
    layers = ModelCosts(spec).moe_layers
    busy = {"attention_node_0": 0.2, "expert_node_0": 0.4}
    run = gpu_row(1, 2, busy, {"attention_node_0": 0.1, "expert_node_0": 0.2}, 1.0, 6400)
    run["args"].update(concurrency=64, input_len=[64, 128], output_len=[64, 128])
    run["rows"][0]["cpu_s"] = {"gateway": 0.64}  # 100 µs of the gateway's CPU per output token
    (tmp_path / "row.json").write_text(json.dumps(run))
    (tmp_path / "trace.json").write_text(json.dumps(served_trace()))  # its steps eager: 1850 µs of host phases
    (tmp_path / "cal.json").write_text(json.dumps({
        "device": "H200", "bench_layer": str(benchmarks / "gpu_dataplane/bench_layer_2.json"),
        "bench_transport": str(benchmarks / "gpu_multi/bench_ipc.json"), "datasheet_bytes_per_s": 4.8e12,
        "datasheet_flops_per_s": 9.89e14, "round_link_bytes_per_s": 4.5e11,
        "served": {"model": "model", "sweep": "row.json", "eager_trace": "trace.json"}}))
    cal = calibration.load(str(tmp_path / "cal.json"))
    assert cal.eager_layer_us == pytest.approx(1850 / layers)
    phases, _ = gpu_phases_of(run, 0, spec, cal.served.crossing_us)
    assert cal.served is not None and cal.served.dispatch_us == 0.0
    assert cal.step_overhead_us > 0 and phases.step_host_us > 0
    assert cal.gateway_us_per_token == pytest.approx(100.0) and cal.gateway_us_per_message == 0.0
    # a row that counts its steps: GATEWAY_US_PER_MESSAGE a message (a step's to each gateway process), the rest
    # by token: 500 steps x 4 processes x 235 µs = 0.47 s of the 0.64
    from expertmesh.planner.served import GATEWAY_US_PER_MESSAGE, gateway_costs
    run["rows"][0]["steps_per_node"] = {"a0": [500, 0]}
    per_token, per_message = gateway_costs({**run["args"], "gateway_workers": 4}, run["rows"][0])
    assert per_message == GATEWAY_US_PER_MESSAGE == 235.0
    assert per_token == pytest.approx((0.64e6 - 500 * 4 * 235.0) / 6400)
    # one batch size served: its host time as a line of GPU_STEP_HOST_PER_SEQUENCE_US a sequence, through its point
    from expertmesh.planner.served import GPU_STEP_HOST_PER_SEQUENCE_US
    assert cal.step_overhead_per_sequence_us == GPU_STEP_HOST_PER_SEQUENCE_US
    steps = 0.4 / (0.2e-3 * 2 * layers)
    assert phases.step_host_us == pytest.approx(1e6 / steps - (2 * layers * 200 + 100 + 2 * cal.served.crossing_us))
    with pytest.raises(ConfigError, match="give model and trace or sweep"):
        calibration.with_served(cal, {"model": "model"}, tmp_path)


def test_a_gpus_served_parts_add_their_excess_over_bench_at_any_context():
    """additive (GPU rows): the served spans are the bench parts plus a fixed excess (extra kernels, launches), so at
    a longer context the attention part grows by what bench layer grows by, not by the factor fitted at short ones."""
    spec = shape("tiny")[1]
    costs = ModelCosts(spec, 4)
    phases = phases_of(served_trace())
    cal = served_calibration(CAL, phases, spec, CPU, tokens=16, context=48, dtype_bytes=4, additive=True)
    served = cal.served
    assert (served.attention_factor, served.experts_factor) == (1.0, 1.0)
    assert attention_us(costs, CPU, CAL, 16, 48) + served.attention_extra_us == pytest.approx(1000)
    assert experts_us(costs, CPU, CAL, 16, spec.num_experts) + served.experts_extra_us == pytest.approx(2000)
    assert calibration.Calibration.from_dict(cal.to_dict()) == cal
    plan = Deployment(CPU, CPU, 1, 1, 1, 32, 128)
    short, long = (step_parts(costs, plan, cal, 16, context, 1)[0] for context in (48, 4096))
    bench_growth = attention_us(costs, CPU, CAL, 16, 4096) - attention_us(costs, CPU, CAL, 16, 48)
    assert long - short == pytest.approx(bench_growth)
    factor = served_calibration(CAL, phases, spec, CPU, tokens=16, context=48, dtype_bytes=4)
    assert step_parts(costs, plan, factor, 16, 48, 1)[0] == pytest.approx(short)  # the same where both were fitted
    assert step_parts(costs, plan, factor, 16, 4096, 1)[0] > long  # the factor scales the longer KV reads too


def test_the_host_time_of_eager_steps_bounds_them_in_disaggregated_plans():
    """served.eager_layer_us: the traced steps with dispatch phases (eager), all their phases but sampling, per MoE
    layer; the closed loop then times a disaggregated step that carries prompts at least that per layer."""
    from expertmesh.planner.perf import closed_loop
    from expertmesh.planner.served import eager_layer_us
    spec = shape("tiny")[1]
    trace = served_trace()
    layers = ModelCosts(spec).moe_layers
    assert eager_layer_us(trace, 1) == pytest.approx(100 + 1000 + 300 + 50 + 400)
    free = calibration.Linear(0.0, 0.0, 0.0)
    cal = calibration.Calibration("gpu", 1.0, 1.0, None, None, free, free, free, False, None, step_overhead_us=100.0)
    fast = dataclasses.replace(CPU, hbm_tb_s=1e9, bf16_tflops=1e9)
    jobs = [(8, 4)] * 4
    disaggregated, colocated = Deployment(fast, fast, 1, 1, 1, 8, 64), Deployment(fast, None, 1, 0, 1, 8, 64)
    for plan, slower in ((disaggregated, True), (colocated, False)):
        timed = closed_loop(spec, plan, dataclasses.replace(cal, eager_layer_us=5000.0), jobs, concurrency=2)
        untimed = closed_loop(spec, plan, cal, jobs, concurrency=2)
        # the steps that prefill take layers x 5 ms when disaggregated; colocated nodes are not bound by it
        assert (timed["ttft_ms_p50"] >= layers * 5.0) == slower
        assert (timed["tokens_per_s"] < untimed["tokens_per_s"]) == slower
        # steps of at most prefill_graph_tokens tokens replay a CUDA graph: no launches to wait for
        graphed = closed_loop(spec, plan, dataclasses.replace(cal, eager_layer_us=5000.0), jobs, concurrency=2,
                              prefill_graph_tokens=512)
        assert graphed["tokens_per_s"] == pytest.approx(untimed["tokens_per_s"])


def test_a_round_to_several_expert_nodes_waits_for_the_slowest():
    """The traced rounds' larger of two draws, over their median, is what a second expert node adds to a round
    (half each way in T_c); more nodes add more, by the normal's order statistics; one node adds nothing."""
    import statistics

    from expertmesh.planner.perf import slowest_of
    from expertmesh.planner.served import slower_of_two_us
    rounds = [2000.0, 2100.0, 2500.0, 3900.0, 2050.0]
    larger = [max(a, b) for a in rounds for b in rounds]  # every ordered pair, with replacement
    assert slower_of_two_us(rounds) == pytest.approx(statistics.mean(larger) - statistics.median(rounds))
    assert slower_of_two_us([2500.0] * 4) == 0
    assert slowest_of(1) == 0 and slowest_of(2) == pytest.approx(1.0)
    assert 1.0 < slowest_of(3) < slowest_of(4) < slowest_of(8) < 2.6  # exact: 1.50, 1.82, 2.52

    spec = shape("tiny")[1]
    costs = ModelCosts(spec, 4)
    phases = dataclasses.replace(phases_of(served_trace()), slower_of_two_us=400.0)
    cal = served_calibration(CAL, phases, spec, CPU, tokens=16, context=48, dtype_bytes=4)
    assert cal.served.slower_of_two_us == 400.0 and calibration.Calibration.from_dict(cal.to_dict()) == cal
    one, two = (Deployment(CPU, CPU, 1, n, 1, 32, 128) for n in (1, 2))
    assert comm_us(costs, one, cal, 16) == 250
    reached = 2 * (1 - (1 - fanout(spec, 2) / 2) ** 16)  # expert nodes a microbatch of 16 reaches, on average
    assert comm_us(costs, two, cal, 16) == pytest.approx(250 + 400 * slowest_of(reached) / 2)
