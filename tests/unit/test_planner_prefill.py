"""The planner's prefill and host terms: prompts admitted as the attention node's scheduler admits them and timed
by the eager prefill lines (bench layer --prefill-tokens), and host time per step as a line in its sequences."""
from __future__ import annotations

import dataclasses

import pytest

from expertmesh.model.shapes import shape
from expertmesh.planner import calibration
from expertmesh.planner.gpus import BUILTIN
from expertmesh.planner.perf import Deployment, ModelCosts, _floor_us, closed_loop
from expertmesh.planner.served import ServedPhases, served_calibration, step_host_line, with_host_per_sequence

FREE = calibration.Linear(0.0, 0.0, 0.0)
# every op free but what a test sets: steps cost exactly their host time and prefill lines
CAL = calibration.Calibration("test", 1.0, 1.0, None, None, FREE, FREE, FREE, False, None, step_overhead_us=1000.0)
INSTANT = dataclasses.replace(BUILTIN["H200"], hbm_tb_s=1e12, bf16_tflops=1e12)
SPEC = shape("mixtral")[1]


def test_admission_keeps_the_schedulers_token_budget():
    """max_batch_tokens 100 less the running sequences' decode tokens: step 1 feeds the 100-token prompt alone,
    step 2 (1 decoding, budget 99) the first 50-token prompt and 49 tokens of the second, step 3 the second's last
    token and the 1-token prompt. With 1 ms steps the TTFTs are 1, 2, 3, 3 ms: p50 3 ms (a budget that ignored
    the decodes gives 2)."""
    plan = Deployment(INSTANT, None, 1, 0, 1, 8, 256)
    result = closed_loop(SPEC, plan, CAL, [(100, 5), (50, 5), (50, 5), (1, 5)], concurrency=4, max_batch_tokens=100)
    assert result["ttft_ms_p50"] == pytest.approx(3.0)


def test_a_prompt_longer_than_the_budget_prefills_in_chunks():
    """2048 of the 3000 tokens at step 1, the other 952 and the 10-token prompt at step 2: both first tokens at
    2 ms; then 1 decode step. A step's prompt tokens never exceed the budget, so neither does its prefill time."""
    cal = dataclasses.replace(CAL, prefill_attention=calibration.Linear(0.0, 0.0, 1.0))
    plan = Deployment(INSTANT, None, 1, 0, 1, 8, 4096)
    result = closed_loop(SPEC, plan, CAL, [(3000, 2), (10, 2)], concurrency=2, max_batch_tokens=2048)
    assert result["ttft_ms_p50"] == pytest.approx(2.0) and result["tpot_ms_p50"] == pytest.approx(1.0)
    costs = ModelCosts(SPEC)
    layers = costs.moe_layers + costs.dense_layers
    # the prefill line at 1 µs per token: 2048 tokens at step 1, 952 + 10 at step 2 (a prompt whole: 3000)
    timed = closed_loop(SPEC, plan, cal, [(3000, 2), (10, 2)], concurrency=2, max_batch_tokens=2048)
    assert timed["ttft_ms_p50"] == pytest.approx((2000 + layers * 3010) / 1e3, rel=1e-3)


def test_prefill_steps_take_the_prefill_lines_and_decode_steps_do_not():
    cal = dataclasses.replace(CAL, prefill_attention=calibration.Linear(300.0, 0.0, 0.0),
                              prefill_experts=calibration.Linear(200.0, 0.0, 0.0))
    costs = ModelCosts(SPEC)
    plan = Deployment(INSTANT, None, 1, 0, 1, 8, 256)
    result = closed_loop(SPEC, plan, cal, [(60, 4)], concurrency=1)
    prefill_us = costs.moe_layers * (300 + 200) + costs.dense_layers * 300
    assert result["ttft_ms_p50"] == pytest.approx((1000 + prefill_us) / 1e3, rel=1e-3)
    assert result["tpot_ms_p50"] == pytest.approx(1.0, rel=1e-3)
    # the first step prefills alone (its host time counts as prefill), then 3 decode steps
    assert result["prefill_share"] == pytest.approx((1000 + prefill_us) / (prefill_us + 4000), rel=1e-3)
    # without prefill lines a prompt is timed by the decode lines (free here)
    assert closed_loop(SPEC, plan, CAL, [(60, 4)], concurrency=1)["ttft_ms_p50"] == pytest.approx(1.0, rel=1e-3)


def test_host_time_per_step_grows_with_its_sequences():
    cal = dataclasses.replace(CAL, step_overhead_per_sequence_us=100.0)
    plan = Deployment(INSTANT, None, 1, 0, 1, 8, 256)
    # 3 sequences decode together: 1000 + 3 x 100 µs a step
    assert closed_loop(SPEC, plan, cal, [(10, 6)] * 3, concurrency=3)["tpot_ms_p50"] == pytest.approx(1.3, rel=1e-3)
    assert cal.step_host_us(32) == pytest.approx(4200)
    assert calibration.Calibration.from_dict(cal.to_dict()) == cal
    # one batch size measured (a GPU row): a line of the given slope through its point
    line = with_host_per_sequence(CAL, 64, per_sequence_us=15.0)
    assert (line.step_overhead_us, line.step_overhead_per_sequence_us) == (1000 - 64 * 15, 15.0)
    assert line.step_host_us(64) == pytest.approx(1000)


def test_a_gateway_slower_than_the_nodes_sets_the_pace_and_the_wait():
    """4 requests of 10 tokens, 2 in flight, 1 ms steps: the nodes finish in 20 ms (two waves of 10 steps, the
    first of each a prefill), the gateway needs 40 tokens x 1 ms; the difference (20 ms) is waited before first
    tokens, over 4 requests in 2 slots: +10 ms on the TTFT p50 of 1 ms."""
    cal = dataclasses.replace(CAL, gateway_us_per_token=1000.0)
    plan = Deployment(INSTANT, None, 1, 0, 1, 8, 256)
    result = closed_loop(SPEC, plan, cal, [(10, 10)] * 4, concurrency=2)
    assert result["tokens_per_s"] == pytest.approx(1000.0) and result["gateway_bound"]
    assert result["ttft_ms_p50"] == pytest.approx(1.0 + 20.0 * 2 / 4)
    assert not closed_loop(SPEC, plan, CAL, [(10, 10)] * 4, concurrency=2)["gateway_bound"]
    # two gateway processes share the tokens: 20 ms of gateway time, as long as the nodes take
    two = closed_loop(SPEC, plan, cal, [(10, 10)] * 4, concurrency=2, gateway_workers=2)
    assert two["tokens_per_s"] == pytest.approx(2000.0) and two["ttft_ms_p50"] == pytest.approx(1.0)
    # CPU per step message: each of the 20 steps sends one to each gateway process with requests in it, so a second
    # process takes as many messages again and the gateway's time stays 20 x 2 ms = 40 ms
    per_message = dataclasses.replace(CAL, gateway_us_per_message=2000.0)
    for workers in (1, 2):
        result = closed_loop(SPEC, plan, per_message, [(10, 10)] * 4, concurrency=2, gateway_workers=workers)
        assert result["tokens_per_s"] == pytest.approx(1000.0) and result["gateway_bound"]
    # more processes than requests in flight: only 2 of 4 processes get a step's messages
    four = closed_loop(SPEC, plan, per_message, [(10, 10)] * 4, concurrency=2, gateway_workers=4)
    assert four["tokens_per_s"] == pytest.approx(2000.0)


def test_the_host_paths_latency_leaves_a_closed_loops_slots_empty_and_adds_to_the_ttft():
    """4 requests of 10 tokens, 2 in flight, 1 ms steps, 5 ms from client to node and back: each wave's requests
    reach the node 5 ms after the slots freed (the first at 5 ms), so the two waves end at 15 and 30 ms, not 10 and
    20, and each first token reaches its client 5 ms after the node's 1 ms."""
    plan = Deployment(INSTANT, None, 1, 0, 1, 8, 256)
    cal = dataclasses.replace(CAL, host_latency_us=5000.0)
    result = closed_loop(SPEC, plan, cal, [(10, 10)] * 4, concurrency=2)
    assert result["tokens_per_s"] == pytest.approx(40 / 30e-3)
    assert result["ttft_ms_p50"] == pytest.approx(6.0)
    assert result["tpot_ms_p50"] == pytest.approx(1.0)
    assert closed_loop(SPEC, plan, CAL, [(10, 10)] * 4, concurrency=2)["tokens_per_s"] == pytest.approx(2000.0)


def test_async_scheduling_overlaps_the_host_with_the_device():
    """Decode steps of 1 ms host time and 0.6 ms of device time (the prefill lines make a step's device part
    here): in order, 1.6 ms; with the next step prepared while the device runs, 1 ms, the longer part."""
    cal = dataclasses.replace(CAL, attention=calibration.Linear(0.6e3 / ModelCosts(SPEC).moe_layers, 0.0, 0.0))
    jobs = [(10, 6)] * 2
    for asynchronous, tpot_ms in ((False, 1.6), (True, 1.0)):
        plan = Deployment(INSTANT, None, 1, 0, 1, 8, 256, async_scheduling=asynchronous)
        assert closed_loop(SPEC, plan, cal, jobs, concurrency=2)["tpot_ms_p50"] == pytest.approx(tpot_ms, rel=1e-3)


def test_step_host_line_from_traced_runs_at_several_batch_sizes():
    assert step_host_line([(4, 1400.0), (16, 2600.0), (32, 4200.0)]) == pytest.approx((1000.0, 100.0), rel=1e-4)
    with pytest.raises(Exception, match="2 batch sizes"):
        step_host_line([(16, 2600.0)])
    spec, cpu = shape("tiny")[1], BUILTIN["H200"]
    costs = ModelCosts(spec, 4)
    cal = dataclasses.replace(CAL, attention=calibration.Linear(10.0, 1.0), experts=calibration.Linear(10.0, 1.0))

    def phases(sequences: int) -> ServedPhases:  # host per step: 800 + 50 per sequence, besides lm_head's floor
        lm_head = _floor_us(costs.elt * spec.vocab_size * spec.hidden_size,
                            2 * sequences * spec.vocab_size * spec.hidden_size, cpu, cal)
        return ServedPhases(100.0, 100.0, 10.0, 10.0, 10.0, 50.0, 800 + 50 * sequences + lm_head)

    fitted = served_calibration(cal, phases(16), spec, cpu, tokens=16, context=48, dtype_bytes=4,
                                other_batches={4: phases(4), 32: phases(32)})
    assert (fitted.step_overhead_us, fitted.step_overhead_per_sequence_us) == pytest.approx((800, 50), rel=1e-4)


def test_waiting_prompts_join_in_fewer_mixed_steps_at_a_cost_in_ttft():
    """max_waiting_steps, as the scheduler holds admissions: fewer steps carry prompts beside decodes (on a GPU
    each runs eagerly), each prompt's first token later."""
    plan = Deployment(INSTANT, INSTANT, 1, 1, 1, 8, 256)
    jobs = [(20, 10 + i % 7) for i in range(64)]
    at_once = closed_loop(SPEC, plan, CAL, jobs, concurrency=8)
    held = closed_loop(SPEC, plan, CAL, jobs, concurrency=8, max_waiting_steps=4)
    assert held["mixed_step_share"] < 0.6 * at_once["mixed_step_share"]
    assert held["ttft_ms_p50"] > at_once["ttft_ms_p50"]


def test_a_graphed_step_reads_the_expert_weights_once_for_its_prompts_and_decodes():
    """Experts cost a fixed 100 µs a layer per microbatch (their weights' read), whatever its tokens. Eager, a
    step's prompt tokens are one more microbatch: a step that admits a prompt beside decodes reads the weights
    twice. Within prefill_graph_tokens the step replays one graph, the prompt inside the decodes' microbatch: once,
    so every step costs the same, and a prompt's first token comes a step after its admission."""
    cal = dataclasses.replace(CAL, step_overhead_us=0.0, experts=calibration.Linear(100.0, 0.0, 0.0),
                              prefill_experts=calibration.Linear(100.0, 0.0, 0.0))
    plan = Deployment(INSTANT, None, 1, 0, 1, 8, 256)
    layers = ModelCosts(SPEC).moe_layers
    jobs = [(8, 3), (8, 6), (8, 9)] * 2  # sequences finish apart: prompts join decoding ones
    eager = closed_loop(SPEC, plan, cal, jobs, concurrency=3, prefill_graph_tokens=0)
    graphed = closed_loop(SPEC, plan, cal, jobs, concurrency=3, prefill_graph_tokens=512)
    assert graphed["tpot_ms_p50"] == pytest.approx(layers * 100 / 1e3, rel=1e-3)
    assert graphed["ttft_ms_p50"] == pytest.approx(layers * 100 / 1e3, rel=1e-3)
    assert eager["tokens_per_s"] < graphed["tokens_per_s"]
    # a step past the cap runs eagerly again
    capped = closed_loop(SPEC, plan, cal, jobs, concurrency=3, prefill_graph_tokens=8)
    assert capped["tokens_per_s"] == pytest.approx(eager["tokens_per_s"])


def test_a_graphed_steps_prompt_tokens_take_the_prefill_attention_line():
    """Inside a graph a prompt chunk's attention is compute-bound, where the decode line is memory-bound: with a
    prefill attention line, each layer adds what that line gives beyond the decode line's cost of the same tokens.
    One 8-token prompt, its own graphed step: 1 µs per chunk token a layer over a free decode line."""
    cal = dataclasses.replace(CAL, step_overhead_us=0.0, prefill_attention=calibration.Linear(0.0, 0.0, 1.0))
    plan = Deployment(INSTANT, None, 1, 0, 1, 8, 256)
    free = closed_loop(SPEC, plan, dataclasses.replace(cal, prefill_attention=None), [(8, 2)], concurrency=1,
                       prefill_graph_tokens=512)
    timed = closed_loop(SPEC, plan, cal, [(8, 2)], concurrency=1, prefill_graph_tokens=512)
    assert free["ttft_ms_p50"] == pytest.approx(0.0, abs=1e-6)
    assert timed["ttft_ms_p50"] == pytest.approx(SPEC.num_layers * 8 / 1e3, rel=1e-3)
    assert timed["tpot_ms_p50"] == pytest.approx(free["tpot_ms_p50"], abs=1e-6)  # decode steps as before


def test_a_graphed_step_with_prompts_adds_the_measured_attention_extra_per_layer():
    """mixed_attention_extra_us (short prompts' attention in a served graph, from a GPU timeline): 100 µs a layer on
    the graphed prompt step, the TTFT, and nothing on decode steps, nor on a prompt step run eagerly; with a prefill
    attention line the prompts' attention is that line's, not this term's."""
    cal = dataclasses.replace(CAL, step_overhead_us=0.0)
    plan = Deployment(INSTANT, None, 1, 0, 1, 8, 256)
    extra = dataclasses.replace(cal, mixed_attention_extra_us=100.0)
    free = closed_loop(SPEC, plan, cal, [(8, 3)], concurrency=1, prefill_graph_tokens=512)
    timed = closed_loop(SPEC, plan, extra, [(8, 3)], concurrency=1, prefill_graph_tokens=512)
    assert timed["ttft_ms_p50"] - free["ttft_ms_p50"] == pytest.approx(SPEC.num_layers * 0.1, rel=1e-3)
    assert timed["tpot_ms_p50"] == pytest.approx(free["tpot_ms_p50"], abs=1e-6)
    eager = closed_loop(SPEC, plan, extra, [(8, 3)], concurrency=1, prefill_graph_tokens=0)
    assert eager["ttft_ms_p50"] == pytest.approx(
        closed_loop(SPEC, plan, cal, [(8, 3)], concurrency=1, prefill_graph_tokens=0)["ttft_ms_p50"], abs=1e-6)
    line = dataclasses.replace(cal, prefill_attention=calibration.Linear(0.0, 0.0, 1.0))
    assert closed_loop(SPEC, plan, dataclasses.replace(line, mixed_attention_extra_us=100.0), [(8, 3)], concurrency=1,
                       prefill_graph_tokens=512)["ttft_ms_p50"] == pytest.approx(
        closed_loop(SPEC, plan, line, [(8, 3)], concurrency=1, prefill_graph_tokens=512)["ttft_ms_p50"], abs=1e-6)


def test_node_shares_split_the_jobs_and_requests_as_the_gateways_did():
    """Two colocated nodes, 1 ms steps: 8 one-token jobs split 6 : 2 take the busier node's 6 steps (1 slot each:
    2 in flight, one a node), where an even split takes 4; shares that do not fit the nodes are refused."""
    plan = Deployment(INSTANT, None, 2, 0, 1, 1, 256)
    jobs = [(1, 1)] * 8
    even = closed_loop(SPEC, plan, CAL, jobs, concurrency=2)
    skewed = closed_loop(SPEC, plan, CAL, jobs, concurrency=2, node_shares=[6, 2])
    assert even["tokens_per_s"] == pytest.approx(8 / 4e-3) and skewed["tokens_per_s"] == pytest.approx(8 / 6e-3)
    with pytest.raises(ValueError, match="need 2 non-negative shares"):
        closed_loop(SPEC, plan, CAL, jobs, concurrency=2, node_shares=[1.0])


def test_a_steps_device_time_outside_its_graph_adds_to_every_decode_step():
    """step_outside_graph_us (sampling, copies: measured from a GPU timeline) is device time: a decode step of 1 ms
    of layers becomes 1.25 ms, whatever the host's share under async scheduling."""
    cal = dataclasses.replace(CAL, step_overhead_us=0.0, experts=calibration.Linear(1000.0 / SPEC.num_layers, 0, 0))
    plan = Deployment(INSTANT, None, 1, 0, 1, 8, 256, async_scheduling=True)
    base = closed_loop(SPEC, plan, cal, [(1, 6)], concurrency=1)["tpot_ms_p50"]
    outside = closed_loop(SPEC, plan, dataclasses.replace(cal, step_outside_graph_us=250.0), [(1, 6)],
                          concurrency=1)["tpot_ms_p50"]
    assert outside - base == pytest.approx(0.25, rel=1e-3)


@pytest.mark.parametrize("graphs", [None, 0])
def test_the_planners_steady_state_is_the_closed_loops_with_prompts_graphed_or_eager(graphs):
    """`expertmesh plan` ranks by predict; plan_validation checks closed_loop against served runs. Over a run of 12
    waves at a full batch of 256 (two prompts join about every step) they agree within 10%: with the prompts inside
    the steps' graphs (the engine's default, None) and as one eager microbatch (0). closed_loop's run has a ramp and a
    tail, so it comes out a few % lower. When predict costed every prompt as an eager microbatch of its own, it was
    51% under the graphed run and 32% under the eager one."""
    import random
    from expertmesh.planner.perf import predict
    cal = dataclasses.replace(calibration.H200, mixed_attention_extra_us=45.0)
    plan = Deployment(BUILTIN["H200"], None, 1, 0, 1, 256, 512, async_scheduling=True)
    rng = random.Random(0)
    jobs = [(rng.randint(96, 160), rng.randint(64, 192)) for _ in range(256 * 12)]  # means 128, 128
    steady = predict(SPEC, plan, cal, 128, 128, prefill_graph_tokens=graphs)
    run = closed_loop(SPEC, plan, cal, jobs, concurrency=256, prefill_graph_tokens=2048 if graphs is None else 0)
    assert run["tokens_per_s"] == pytest.approx(steady.tokens_per_s, rel=0.1)
