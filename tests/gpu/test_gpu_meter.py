"""telemetry.GpuMeter: the device time of its spans (eager, and inside CUDA graphs at every replay), not the work
queued before them, read without a host sync."""
import pytest
import torch

from expertmesh.telemetry import GpuMeter

pytestmark = pytest.mark.gpu


def _sleep_ms(ms: float) -> None:
    """A kernel that spins for about `ms` on the device (cycles from the clock rate)."""
    torch.cuda._sleep(int(ms * 1e-3 * torch.cuda.get_device_properties(0).clock_rate * 1e3))


def test_spans_time_their_own_work_and_not_what_was_queued_before():
    meter = GpuMeter("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # spans must not wait on the device
    try:
        _sleep_ms(20)  # queued before the span: the span starts when the stream reaches it
        with meter.span():
            _sleep_ms(5)
        with meter.span():
            _sleep_ms(5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    seconds, spans = meter.totals()
    assert spans == 2
    assert 0.008 < seconds < 0.016, seconds  # 2 x 5 ms, not 20 + 10


def test_spans_inside_a_graph_are_timed_at_every_replay_without_a_host_sync():
    meter = GpuMeter("cuda")
    x = torch.ones(64, 64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x @ x  # the matmul's workspace outside the capture
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        _sleep_ms(3)  # not in a span
        with meter.span():
            _sleep_ms(2)
            y = x @ x
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            graph.replay()
        meter.totals()  # starts a copy of the device's counters; never waits
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    meter.totals()  # the copy started above has finished: its counters are read, the next copy starts
    torch.cuda.synchronize()
    seconds, spans = meter.totals()
    assert spans == 5, spans
    assert 0.008 < seconds < 0.013, seconds  # 5 x 2 ms, not 5 x 5
    assert y.sum().item() == 64 * 64 * 64


def test_the_timeline_shows_where_the_last_replay_of_each_captured_span_ran_on_the_host_clock():
    import time
    meter = GpuMeter("cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with meter.span("first", 0):
            _sleep_ms(2)
        _sleep_ms(1)  # not in a span: the gap between the two
        with meter.span("second", 1):
            _sleep_ms(3)
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    replayed_us = time.time_ns() / 1e3
    graph.replay()  # the timeline holds this one, once it has run (timeline waits for its own stream only)
    torch.cuda.synchronize()
    events = meter.timeline()
    assert [(label, row) for label, _, _, row in events] == [("first", 0), ("second", 1)]
    (_, first_start, first_us, _), (_, second_start, second_us, _) = events
    assert 1500 < first_us < 3000 and 2500 < second_us < 4500, events
    assert first_start + first_us + 500 < second_start < first_start + first_us + 2000  # the 1 ms between
    # the second replay's, on the host's clock: after the first replay had finished, within a second of now
    assert replayed_us < first_start < time.time_ns() / 1e3 and first_start > time.time_ns() / 1e3 - 1e6
