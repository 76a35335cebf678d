"""Where a node's time goes: seconds per phase (attention, dispatch, combine, expert compute, ...) and,
while tracing is on, a timeline of phase events for a Chrome-trace/Perfetto view.

Only synchronous work is timed; a node's idle time is its wall time minus its timed phases."""
from __future__ import annotations

import time
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Iterator

import torch


class PhaseClock:
    MAX_EVENTS = 500_000  # bounded memory when tracing is left on

    def __init__(self) -> None:
        self.started_ns = time.time_ns()
        self.seconds: dict[str, float] = defaultdict(float)
        self.recording = False
        self.events: list[list] = []  # [name, start_us, duration_us, microbatch]

    @contextmanager
    def phase(self, name: str, microbatch: int = 0) -> Iterator[None]:
        start = time.time_ns()
        try:
            yield
        finally:
            end = time.time_ns()
            self.seconds[name] += (end - start) / 1e9
            if self.recording and len(self.events) < self.MAX_EVENTS:
                self.events.append([name, start / 1e3, (end - start) / 1e3, microbatch])

    @property
    def wall_seconds(self) -> float:
        return (time.time_ns() - self.started_ns) / 1e9

    def totals(self) -> tuple[list[str], list[float], float]:
        """(phase names, seconds in each, wall seconds since start) for status messages."""
        names = sorted(self.seconds)
        return names, [self.seconds[n] for n in names], self.wall_seconds

    def toggle_trace(self, record: bool) -> list[list]:
        """Starts a fresh timeline (returns []), or stops and returns the one recorded."""
        self.recording = record
        events, self.events = self.events, []
        return [] if record else events


class GpuMeter:
    """Device time of a node's compute, from CUDA events recorded around it on the current stream: how busy the
    GPU was, apart from waiting on links (the phases above time the host, which on a GPU only enqueues). A span
    starts when the stream reaches it, so a wait queued before it does not count. Events are read once the GPU
    has passed them, never waited on; spans inside a CUDA graph capture are not timed (events cannot be)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds = 0.0
        self.spans = 0
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()

    @contextmanager
    def span(self) -> Iterator[None]:
        if not self.enabled or torch.cuda.is_current_stream_capturing():
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((start, end))
        self._read()

    def _read(self) -> None:
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self.seconds += start.elapsed_time(end) / 1e3
            self.spans += 1

    def totals(self) -> tuple[float, int]:
        """(busy seconds, spans) of the spans the GPU has finished."""
        self._read()
        return self.seconds, self.spans


def chrome_trace(node_events: dict[str, list[list]]) -> dict:
    """Chrome trace JSON (viewable in Perfetto): one process row per node, one thread per microbatch."""
    trace = []
    for pid, (node, events) in enumerate(sorted(node_events.items())):
        trace.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": node}})
        for name, start_us, duration_us, microbatch in events:
            trace.append({"name": name, "ph": "X", "pid": pid, "tid": microbatch, "ts": start_us,
                          "dur": duration_us})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}
