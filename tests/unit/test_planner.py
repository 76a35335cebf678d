"""The planner: calibration fits, the performance model against bench layer's own accounting and hand-computed
values, the search and its errors, `plan --out` then loading that config, and the GPU-type check of each role."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import astuple
from pathlib import Path

import pytest

from expertmesh.cli import main
from expertmesh.config import Config
from expertmesh.model.shapes import shape
from expertmesh.planner import calibration
from expertmesh.planner.calibration import fit_line
from expertmesh.planner.gpus import BUILTIN, GpuTypeMismatch, check_cluster_gpus, load_gpus
from expertmesh.planner.perf import Deployment, ModelCosts, closed_loop, fanout, layer_us, predict
from expertmesh.planner.search import NoFeasiblePlan, Objective, search

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
H200 = BUILTIN["H200"]


def test_fit_line_recovers_a_known_line_and_keeps_costs_non_negative():
    points = [(x, t, 5.0 + 0.5 * x + 2.0 * t) for x, t in ((1, 1), (10, 3), (100, 7), (1000, 2), (50, 50))]
    assert astuple(fit_line(points)) == pytest.approx((5.0, 0.5, 2.0), rel=1e-4)
    fitted = fit_line([(1, 0, 10.0), (2, 0, 9.0), (3, 0, 8.0)])  # falling: a negative slope is refused
    assert fitted.slope == 0 and 8 < fitted.overhead_us < 10


def test_shipped_h200_calibration_is_the_fit_of_our_runs(tmp_path):
    path = tmp_path / "h200.yaml"  # a --calibration file naming the two benchmark JSONs
    path.write_text(f"device: H200\nbench_layer: [{BENCH / 'gpu_dataplane/bench_layer_2.json'}, "
                    f"{BENCH / 'gpu_multi/session13/call3/experts_alone.json'}]\n"
                    f"bench_transport: {BENCH / 'gpu_multi/bench_ipc.json'}\nmoe_backend: triton\n"
                    f"round_backend: lockstep-ipc\ndatasheet_bytes_per_s: 4.8e12\ndatasheet_flops_per_s: 9.89e14\n"
                    f"round_link_bytes_per_s: 4.5e11\n")
    fitted = calibration.load(str(path))
    shipped = calibration.H200
    for part in ("attention", "experts", "round"):
        assert astuple(getattr(shipped, part)) == pytest.approx(astuple(getattr(fitted, part)), rel=1e-3), part
    assert shipped.copy_bytes_per_s == pytest.approx(fitted.copy_bytes_per_s, rel=1e-4)
    assert (shipped.experts_in_blocks, shipped.experts_math_rate) == (True, fitted.experts_math_rate) == (True, 0.82)


def test_the_experts_line_follows_the_kernel_past_mixtrals_ridge():
    """Every experts row of the shipped runs, 1 to 2048 tokens, through the planner: within 16%. Mixtral's experts
    at 512 tokens take 1.4x their time at 384 (half of them spill into a second block of 128 rows, computed whole),
    which the floor over the expected padded rows sees and the plain roofline did not (RESULTS.md, thirteenth
    session)."""
    from expertmesh.planner.perf import experts_us
    names = {"Mixtral-8x7B": "mixtral", "Qwen3-30B-A3B": "qwen3"}
    predicted = {}
    for name in ("gpu_dataplane/bench_layer_2.json", "gpu_multi/session13/call3/experts_alone.json"):
        for row in json.loads((BENCH / name).read_text())["rows"]:
            if row["part"] == "experts" and row["backend"] == "triton":
                spec = shape(names[row["shape"]])[1]
                us = experts_us(ModelCosts(spec), H200, calibration.H200, row["tokens"], spec.num_experts)
                assert us == pytest.approx(row["us"], rel=0.17), (row["shape"], row["tokens"])
                predicted[names[row["shape"]], row["tokens"]] = us
    assert predicted["mixtral", 512] > 1.2 * predicted["mixtral", 384]
    plain = dataclasses.replace(calibration.H200, experts_in_blocks=False)
    mixtral = shape("mixtral")[1]
    assert experts_us(ModelCosts(mixtral), H200, plain, 512, 8) < 1.05 * predicted["mixtral", 384]


def test_padded_rows_are_the_expected_whole_blocks_of_random_routing():
    """An expert's rows rounded up to whole blocks, in expectation over uniform top-k routing: against a seeded
    draw of the routing, and at the ends (one block of 16 for a token; rows past 128 spill into a second block)."""
    import random

    from expertmesh.ops.fused_moe_triton import block_rows
    from expertmesh.planner.perf import padded_rows
    rng = random.Random(0)
    for tokens, top_k, experts in ((512, 2, 8), (384, 2, 8), (256, 8, 128), (3, 2, 8)):
        block, draws = block_rows(tokens, top_k, experts), []
        for _ in range(400):
            counts = [0] * experts
            for _ in range(tokens):
                for e in rng.sample(range(experts), top_k):
                    counts[e] += 1
            draws.append(sum(-(-n // block) * block for n in counts) / experts)
        assert padded_rows(tokens, top_k, experts) == pytest.approx(sum(draws) / len(draws), rel=0.02), tokens
    assert padded_rows(1, 2, 8) == pytest.approx(16 * 2 / 8)
    assert 1.4 * 128 < padded_rows(512, 2, 8) < 1.6 * 128


def test_fit_experts_finds_the_kernels_math_rate():
    """Rows made from a known line over floors at 0.7 of the matmul ceiling, half of them bound by their math: the
    fit gives back that rate and line; rows bound by their bytes alone keep the rate at 1."""
    from expertmesh.planner.calibration import Linear, fit_experts, kernel_floor_us
    layer = {"copy_bytes_per_s": 4e12, "matmul_flops_per_s": 8e14, "rows": []}
    line = Linear(15.0, 1.0, 0.05)
    for tokens, bytes_, flops in ((16, 2e9, 1e11), (64, 2e9, 2e11), (256, 2e9, 2.5e11), (512, 2e9, 3e12),
                                  (1024, 2e9, 6e12), (2048, 2e9, 1.2e13)):
        row = {"part": "experts", "backend": "triton", "tokens": tokens, "bytes": bytes_, "flops": flops,
               "kernel_flops": flops}
        row["us"] = line(kernel_floor_us(row, layer, 0.7), tokens)
        layer["rows"].append(row)
    fitted, rate = fit_experts((layer,), "triton")
    assert rate == 0.7 and astuple(fitted) == pytest.approx(astuple(line), rel=1e-3)
    layer["rows"] = [r for r in layer["rows"] if r["flops"] / 8e14 < r["bytes"] / 4e12]
    assert fit_experts((layer,), "triton")[1] == 1.0


def test_roofline_bytes_and_flops_are_bench_layers_and_times_within_10_percent():
    rows = json.loads((BENCH / "gpu_dataplane/bench_layer_2.json").read_text())["rows"]
    names = {"Mixtral-8x7B": "mixtral", "Qwen3-30B-A3B": "qwen3"}
    from expertmesh.planner.perf import attention_us
    for row in (r for r in rows if r["part"] == "attention"):
        costs = ModelCosts(shape(names[row["shape"]])[1])
        tokens, context = row["tokens"], row["context"]
        assert costs.elt * costs.moe_attention_params + tokens * context * costs.kv_bytes_per_token_layer + \
            4 * tokens * costs.spec.hidden_size * costs.elt == row["bytes"]
        assert 2 * tokens * costs.moe_attention_params + tokens * context * costs.attention_flops_per_context == \
            row["flops"]
        # H200's datasheet through the shipped efficiencies: the measured time, from the ceilings of that run
        assert attention_us(costs, H200, calibration.H200, tokens, context) == pytest.approx(row["us"], rel=0.10)


def test_fanout_and_the_pingpong_layer_by_hand():
    mixtral = shape("mixtral")[1]  # 8 experts, top 2
    assert fanout(mixtral, 1) == pytest.approx(1.0)
    assert fanout(mixtral, 2) == pytest.approx(2 * (1 - math.comb(4, 2) / math.comb(8, 2)))
    assert fanout(mixtral, 8) == pytest.approx(2.0)
    plan = Deployment(H200, H200, 1, 1, 2, 64, 1024)
    assert layer_us(100, 80, 50, 2, plan) == 280  # one microbatch's round trip sets it: T_c not hidden
    assert layer_us(100, 80, 50, 4, plan) == 400  # m * T_a >= T_a + T_e + 2 T_c: attention-bound
    colocated = Deployment(H200, None, 1, 0, 1, 64, 1024)
    assert layer_us(100, 80, 0, 1, colocated) == 180
    shared = Deployment(H200, H200, 1, 1, 2, 64, 1024, shared_devices=1)
    assert layer_us(100, 80, 10, 2, shared) == 360  # one device: the parts take turns
    two_cores = Deployment(H200, H200, 2, 2, 1, 64, 1024, shared_devices=2)
    # an expert node computes each attention node's microbatch apart: 2 x 100 + 2 expert nodes x 2 x 80 on 2 devices
    # is 260, but attention nodes sharing devices do not overlap the expert lanes: 100, then 2 x 80, then 2 x 10
    assert layer_us(100, 80, 10, 1, two_cores) == 280
    two_attention = Deployment(H200, H200, 2, 1, 1, 64, 1024)
    assert layer_us(100, 80, 10, 1, two_attention) == 200  # the round trip, not one T_e for both attention nodes
    assert layer_us(100, 120, 10, 1, two_attention) == 240  # the expert node's two lanes


def test_prediction_scales_as_the_model_says():
    spec = shape("qwen3")[1]
    small, large = (predict(spec, Deployment(H200, H200, 2, 2, 2, batch, 1280), calibration.H200, 1024, 256)
                    for batch in (64, 256))
    assert large.step_us > small.step_us and large.tokens_per_s > small.tokens_per_s
    assert large.attention_memory.kv_cache == pytest.approx(4 * small.attention_memory.kv_cache)
    assert small.attention_memory.fits and small.expert_memory.fits
    expert_weights = ModelCosts(spec).experts_bytes(64)  # half of the 128 experts per expert node
    assert small.expert_memory.weights == pytest.approx(expert_weights)
    skewed = predict(spec, Deployment(H200, H200, 2, 2, 2, 64, 1280, expert_load_imbalance=1.5), calibration.H200,
                     1024, 256)  # `simulate`'s busiest expert node at 1.5x the mean: that node's work sets T_e
    assert skewed.experts_us > small.experts_us and skewed.attention_us == small.attention_us


def test_search_meets_the_objective_and_ranks_per_cost():
    spec = shape("qwen3")[1]
    gpus = load_gpus({"H200": 4, "H20": 4}, prices={"H200": 3.0, "H20": 1.2})
    loose = search(spec, gpus, Objective(80, 512, 256), calibration.H200, top=3)
    tight = search(spec, gpus, Objective(30, 512, 256), calibration.H200, top=3)
    for plans, objective_ms in ((loose, 80), (tight, 30)):
        assert all(p.prediction.tpot_p99_us <= objective_ms * 1e3 for p in plans)
        per_cost = [p.tokens_per_s_per_dollar_hour for p in plans]
        assert all(a >= b * (1 - 1e-3) for a, b in zip(per_cost, per_cost[1:]))  # ties within 4 digits
        assert all(p.deployment.attention_gpu.count >= p.deployment.attention_nodes for p in plans)
    # a looser objective can only admit more plans: its best is at least as good per cost
    assert loose[0].tokens_per_s_per_dollar_hour >= tight[0].tokens_per_s_per_dollar_hour


def test_impossible_inputs_say_what_is_short():
    with pytest.raises(NoFeasiblePlan, match=r"short by [\d.]+ GiB"):
        search(shape("deepseek_v3")[1], load_gpus({"H200": 8}), Objective(100, 1024, 256), calibration.H200)
    with pytest.raises(NoFeasiblePlan, match=r"TPOT p99 <= 0.1 ms.*short by"):
        search(shape("qwen3")[1], load_gpus({"H200": 2}), Objective(0.1, 1024, 256), calibration.H200)


def test_gpu_table_override_from_yaml(tmp_path):
    path = tmp_path / "gpus.yaml"
    path.write_text("gpus:\n  - {name: H200, price_per_hour: 4.0, count: 2}\n"
                    "  - {name: MI300X, hbm_gib: 192, hbm_tb_s: 5.3, bf16_tflops: 1307, intra_host_gb_s: 448,"
                    " inter_host_gb_s: 50, count: 4}\n")
    gpus = {g.name: g for g in load_gpus({}, str(path))}
    assert gpus["H200"].price_per_hour == 4.0 and gpus["H200"].hbm_tb_s == 4.8 and gpus["MI300X"].count == 4


def test_plan_out_writes_a_config_that_loads(tmp_path, capsys):
    out = tmp_path / "cluster.yaml"
    assert main(["plan", "--shape", "qwen3", "--gpu-offer", "H200:4,H20:4", "--price", "H200=3", "--price",
                 "H20=1.2", "--tpot-p99-ms", "60", "--prompt-len", "512", "--output-len", "256", "--out", str(out),
                 "--model-path", "/models/qwen3"]) == 0
    printed = capsys.readouterr().out
    assert "#1 " in printed and "T_a" in printed and "why:" in printed
    config = Config.load(out)
    assert config.model.path == "/models/qwen3" and config.model.device == "cuda"
    assert config.cluster.attention_gpu_type in ("H200", "H20") and config.engine.max_num_seqs >= 1
    assert config.engine.max_model_len == 768
    best = printed.split("#2 ")[0]  # the plan written
    workers = int(best.split("gateway: ")[1].split()[0]) if "gateway: " in best else 1
    assert config.gateway.workers == workers > 1  # tens of thousands of tok/s: more than one gateway process
    mini = tmp_path / "mini.json"  # the default model's own path is written too
    assert main(["plan", "--model", "models/expertmesh-mini", "--gpu-offer", "L40S:1", "--tpot-p99-ms", "50",
                 "--prompt-len", "64", "--output-len", "64", "--out", str(mini)]) == 0
    assert json.loads(mini.read_text())["model"]["path"] == "models/expertmesh-mini"
    assert main(["plan", "--shape", "deepseek_v3", "--gpu-offer", "L40S:2", "--tpot-p99-ms", "50"]) == 2
    assert "short by" in capsys.readouterr().err


def test_each_role_must_find_its_planned_gpu_type():
    config = Config()
    config.model.device = "cuda"
    config.cluster.attention_nodes, config.cluster.expert_nodes = 1, 2
    config.cluster.attention_gpus, config.cluster.expert_gpus = [0], [1, 2]
    config.cluster.attention_gpu_type, config.cluster.expert_gpu_type = "H200", "H20"
    names = {"cuda:0": "NVIDIA H200", "cuda:1": "NVIDIA H20", "cuda:2": "NVIDIA H20"}
    check_cluster_gpus(config, names.get)
    names["cuda:2"] = "NVIDIA H200"  # an H200 is not an H20, though its name contains "H20"
    with pytest.raises(GpuTypeMismatch, match=r"expert node 1.*H20.*'NVIDIA H200' on cuda:2"):
        check_cluster_gpus(config, names.get)
    config.model.device = "cpu"
    with pytest.raises(GpuTypeMismatch, match="attention node 0.*no GPU"):
        check_cluster_gpus(config, lambda device: None)
    config.cluster.attention_gpu_type = config.cluster.expert_gpu_type = None
    check_cluster_gpus(config, lambda device: None)  # no plan: anything goes


def test_closed_loop_steps_a_finite_run_as_counted_by_hand():
    """Steps of exactly 1 ms (every op free but the step overhead): 4 requests of 5 tokens, 2 in flight: a prefill
    step then 4 decode steps, twice: 10 ms for 20 tokens, TPOT 1 ms, TTFT 1 ms."""
    free = calibration.Linear(0.0, 0.0, 0.0)
    cal = calibration.Calibration("test", 1.0, 1.0, None, None, free, free, free, False, None, step_overhead_us=1000.0)
    instant = dataclasses.replace(H200, hbm_tb_s=1e12, bf16_tflops=1e12)
    plan = Deployment(instant, None, 1, 0, 1, 8, 64)
    result = closed_loop(shape("mixtral")[1], plan, cal, [(10, 5)] * 4, concurrency=2)
    assert result["tokens_per_s"] == pytest.approx(2000, rel=1e-6)
    assert result["tpot_ms_p50"] == pytest.approx(1.0, rel=1e-6) and result["ttft_ms_p50"] == pytest.approx(1.0)


def test_async_scheduling_admits_a_request_the_step_after_next():
    """1 ms steps, 2 in flight, outputs of 2, 5 and 4 tokens. Synchronously, the third request takes the slot the
    first freed at 2 ms in the next step: 6 steps. With async scheduling that step was scheduled while the one
    before it ran, so it joins a step later: 7 steps, for the same 11 tokens."""
    free = calibration.Linear(0.0, 0.0, 0.0)
    cal = calibration.Calibration("test", 1.0, 1.0, None, None, free, free, free, False, None, step_overhead_us=1000.0)
    instant = dataclasses.replace(H200, hbm_tb_s=1e12, bf16_tflops=1e12)
    jobs = [(10, 2), (10, 5), (10, 4)]
    for async_scheduling, steps in ((False, 6), (True, 7)):
        plan = Deployment(instant, None, 1, 0, 1, 8, 64, async_scheduling=async_scheduling)
        result = closed_loop(shape("mixtral")[1], plan, cal, jobs, concurrency=2)
        assert result["steps"] == steps and result["tokens_per_s"] == pytest.approx(11 / steps * 1e3, rel=1e-6)


@pytest.mark.parametrize("name, expert_nodes", [("qwen3", 4), ("mixtral", 2), ("deepseek_v3", 8)])
def test_fanout_is_the_simulators_on_a_uniform_trace(name, expert_nodes):
    """The planner's messages per token are what `simulate` replays (contiguous placement, routing without skew)."""
    from expertmesh.placement.simulator import (CostModel, assign_round_robin, contiguous_placement, make_workload,
                                                replay)
    from expertmesh.placement.synthetic import synthetic_trace
    from expertmesh.placement.topology import Topology
    display, spec = shape(name)
    trace = synthetic_trace(spec, display, num_docs=2, skew=0.0, seed=0)
    topology = Topology.from_dict({"domains": 1, "attention_nodes": 1, "expert_nodes": expert_nodes})
    workload = make_workload(trace, topology)
    report = replay(trace, workload, assign_round_robin(workload, topology), contiguous_placement(trace, topology),
                    topology, CostModel(spec.hidden_size))
    assert fanout(spec, expert_nodes) == pytest.approx(report.fanout, rel=0.03)


def test_launch_refuses_a_planned_gpu_type_before_starting_anything(tmp_path):
    from expertmesh.launcher.local import LocalCluster
    config = Config()
    config.cluster.attention_gpu_type = "H200"  # planned for an H200, launched on this CPU-only host
    cluster = LocalCluster(config, run_dir=tmp_path)
    with pytest.raises(GpuTypeMismatch, match="attention node 0: the plan puts it on H200"):
        cluster.start()
    assert cluster.children == []



def test_gateway_processes_are_sized_for_the_predicted_stream():
    """Enough gateway processes that none is over GATEWAY_BUSY: CPU per token and per step message (one from each
    attention node each step) from the calibration; one where it measured none; a clear error where the step
    messages alone would fill a process."""
    from expertmesh.planner.perf import GATEWAY_BUSY, gateway_workers
    cal = dataclasses.replace(calibration.H200, gateway_us_per_token=100.0, gateway_us_per_message=0.0)
    assert gateway_workers(cal, GATEWAY_BUSY * 1e4, 40, 1) == 1
    assert gateway_workers(cal, GATEWAY_BUSY * 1e4 + 1, 40, 1) == 2
    assert gateway_workers(cal, 58594, 40, 8) == math.ceil(5.8594 / GATEWAY_BUSY)
    with_messages = dataclasses.replace(cal, gateway_us_per_message=250.0)  # 8 nodes x 40 steps: 8% of a process
    assert gateway_workers(with_messages, 58594, 40, 8) == math.ceil(5.8594 / (GATEWAY_BUSY - 0.08))
    assert gateway_workers(dataclasses.replace(cal, gateway_us_per_token=0.0), 1e6, 40, 1) == 1
    with pytest.raises(ValueError, match="step messages"):
        gateway_workers(with_messages, 1e4, 400, 8)
