"""benchmarks/gpu_timeline.py: a whole step's replay from the GPU rows of a trace, its waits and crossings."""
import pytest

from expertmesh.telemetry import chrome_trace
from tests.benchmark_script import load_benchmark

gpu_timeline = load_benchmark("gpu_timeline")


def step(t0: float) -> tuple[list, list]:
    """One step, 2 MoE layers, m = 2, in µs from t0: attention segments of 100 (the last, lm_head, 50), expert
    computes of 150, each crossing 20. mb0 seg0 [0,100], mb1 seg0 [100,200]; experts mb0 [120,270], mb1 [270,420];
    mb0 seg1 [290,390] (combine 20 after 270), mb1 seg1 [440,540]; experts [410,560], [560,710];
    mb0 seg2 [580,630], mb1 seg2 [730,780]."""
    attention = [["segment 0", 0, 100, 0], ["segment 0", 100, 100, 1], ["segment 1", 290, 100, 0],
                 ["segment 1", 440, 100, 1], ["segment 2", 580, 50, 0], ["segment 2", 730, 50, 1]]
    experts = [["experts, layer 0", 120, 150, 0], ["experts, layer 0", 270, 150, 0],
               ["experts, layer 1", 410, 150, 0], ["experts, layer 1", 560, 150, 0]]
    shift = lambda events: [[name, start + t0, duration, row] for name, start, duration, row in events]  # noqa
    return shift(attention), shift(experts)


def test_a_replay_gives_its_waits_and_crossings():
    a1, e1 = step(0.0)
    a2, e2 = step(10_000.0)
    trace = chrome_trace({"attention node 0": [["attention", 0, 1, 0]], "expert node 0": []},
                         {"attention node 0": a1 + a2, "expert node 0": e1 + e2})
    rows = gpu_timeline.gpu_rows(trace)
    steps = gpu_timeline.replays(rows["attention node 0"])
    assert [len(s) for s in steps] == [6, 6]
    first = gpu_timeline.step_report(steps[0], rows["expert node 0"])
    assert first["step_us"] == 780 and first["rounds"] == first["rounds_matched"] == 4
    assert first["attention_busy"] == pytest.approx(500 / 780)
    assert first["expert_busy"] == pytest.approx(600 / 780)
    # mb1's segment 0 ends at 200, mb0's segment 1 starts at 290; mb1's segment 1 ends at 540, segment 2 at 580
    assert first["layer_wait_us"] == [90, 40]
    assert first["dispatch_us"] == [20, 70, 20, 20]  # mb1's round waits for mb0's compute: 270 - 200
    assert first["combine_us"] == [20, 20, 20, 20]
    assert first["layer_cycle_us"] == [290]  # mb0's segment 1 at 290, segment 2 at 580
    lines = gpu_timeline.report(trace)
    # the spans allow max(2 x 100, 2 x 150, 100 + 150 + 20 + 20) = 300 us a layer
    assert "a layer at m = 2 (microbatch 0's segment to its next): 290.0 us; the spans and crossings allow 300.0 us" \
        in "\n".join(lines)
    assert lines[0] == "attention node 0: 2 whole-step replays (each graph's last)"
    launches = chrome_trace({"attention node 0": [["attention", t, 100, 0] for t in range(0, 20_000, 1000)]})
    assert gpu_timeline.launch_intervals(launches, "attention node 0") == [1000.0] * 10
    assert "attention GPU waits per layer for the experts: median 65.0 us" in "\n".join(lines)


def test_the_report_is_of_the_largest_decode_graph_when_the_labels_name_the_graphs():
    named = lambda events, shape: [[f"{n}, {shape}", *rest] for n, *rest in events]  # noqa: E731
    big, e_big = step(0.0)
    small, e_small = step(10_000.0)
    small = [[n, start, duration / 2, row] for n, start, duration, row in small]  # half the attention spans
    prefill, e_prefill = step(20_000.0)
    trace = chrome_trace({"attention node 0": [["attention", 0, 1, 0]], "expert node 0": []},
                         {"attention node 0": named(big, "decode 128") + named(small, "decode 8")
                          + named(prefill, "prefill 512"), "expert node 0": e_big + e_small + e_prefill})
    assert gpu_timeline.shape_of(gpu_timeline.replays(gpu_timeline.gpu_rows(trace)["attention node 0"])[0]) == \
        "decode 128 + decode 128"
    text = "\n".join(gpu_timeline.report(trace))
    assert "  below: the largest decode graph (decode 128 + decode 128)" in text
    assert "decode 8 + decode 8 755" in text and "prefill 512 + prefill 512 780" in text
    assert "spans: attention 100.0 us" in text  # the big graph's median (100 x 4, 50 x 2); all three pooled: 50


def test_outside_graph_is_the_served_launch_interval_less_the_graph():
    """Launches every 1000 µs (host "attention" phases) against a decode graph whose replay takes 780 µs."""
    attention, experts = step(0.0)
    named = [[f"{n}, decode 128", *rest] for n, *rest in attention]
    trace = chrome_trace({"attention node 0": [["attention", t, 100, 0] for t in range(0, 20_000, 1000)]},
                         {"attention node 0": named, "expert node 0": experts})
    assert gpu_timeline.outside_graph_us(trace) == 220.0
    assert gpu_timeline.outside_graph_us(chrome_trace({"attention node 0": []})) is None


def test_the_mixed_attention_extra_is_the_prompt_graphs_segments_over_the_decode_graphs():
    """One-microbatch graphs: decode 256 with layer segments of 100 µs, prefill 384 of 150 and prefill 512 of 170
    (the last segment, lm_head, 50 in each, left out); prefill 768, past twice the decodes' tokens, does not count:
    the median of 50 and 70 over the decode graph, 60. No decode graph: None."""
    def graph(t0: float, shape: str, segment_us: float) -> list:
        return [[f"segment {j}, {shape}", t0 + 200 * j, segment_us, 0] for j in range(3)] + \
            [[f"segment 3, {shape}", t0 + 600, 50, 0]]
    rows = graph(0, "decode 256", 100) + graph(1000, "prefill 384", 150) + graph(2000, "prefill 512", 170) + \
        graph(3000, "prefill 768", 400)
    assert gpu_timeline.mixed_attention_extra_us(chrome_trace({}, {"attention node 0": rows})) == 60.0
    assert gpu_timeline.mixed_attention_extra_us(chrome_trace({}, {"attention node 0": rows[4:]})) is None


def test_a_trace_without_gpu_rows_says_so():
    trace = chrome_trace({"attention node 0": [["attention", 0, 1, 0]]})
    assert gpu_timeline.report(trace)[0].startswith("no whole-step GPU spans")
