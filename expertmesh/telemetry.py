"""Where a node's time goes: seconds per phase (attention, dispatch, combine, expert compute, ...) and,
while tracing is on, a timeline of phase events for a Chrome-trace/Perfetto view.

Only synchronous work is timed; a node's idle time is its wall time minus its timed phases."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


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


def chrome_trace(node_events: dict[str, list[list]]) -> dict:
    """Chrome trace JSON (viewable in Perfetto): one process row per node, one thread per microbatch."""
    trace = []
    for pid, (node, events) in enumerate(sorted(node_events.items())):
        trace.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": node}})
        for name, start_us, duration_us, microbatch in events:
            trace.append({"name": name, "ph": "X", "pid": pid, "tid": microbatch, "ts": start_us,
                          "dur": duration_us})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}
