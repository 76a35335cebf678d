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
    """Device time of a node's compute: how busy its GPU was, apart from waiting on links (the phases above time
    the host, which on a GPU only enqueues). A span starts when the stream reaches it, so a wait queued before it
    does not count. Eager spans are CUDA events, read once the GPU has passed them, never waited on. Spans inside
    a CUDA graph capture (whole decode steps) cannot use events that the host reads after every replay; they
    capture two one-thread kernels that read the GPU's clock and add the span to counters on the device, which
    the host copies out without waiting (a few microseconds per span and replay). A captured span also keeps the
    start and end of its last replay, for a trace of where the device's work ran (timeline)."""

    MARKS = 16384  # captured spans, one slot each (modulo): spans on different streams may overlap

    def __init__(self, device: str | torch.device | None) -> None:
        """Meters on a CUDA device; elsewhere (None, cpu) spans do nothing."""
        self.enabled = device is not None and torch.device(device).type == "cuda"
        self.seconds = 0.0
        self.spans = 0
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._captured = 0
        self._labels: dict[int, tuple[str, int]] = {}  # a captured span's slot -> (label, row in a trace)
        self._snapshot: tuple[torch.Tensor, torch.cuda.Event] | None = None
        self._device_read = (0.0, 0)
        if self.enabled:  # made here, not at the first captured span: memory made in a capture belongs to the graph
            self.device = torch.device(device)
            with torch.cuda.device(device):  # (its zeroing would be replayed with it)
                self._marks = torch.zeros(self.MARKS, dtype=torch.int64, device=device)  # span starts, ns
                self._ends = torch.zeros(self.MARKS, dtype=torch.int64, device=device)  # and ends
                self._device_totals = torch.zeros(2, dtype=torch.int64, device=device)  # [busy ns, spans]
                self._copies = torch.cuda.Stream()  # where the counters are copied out, apart from the work

    @contextmanager
    def span(self, label: str = "", row: int = 0) -> Iterator[None]:
        """Times the work enqueued inside; a captured span is named `label` on trace row `row` (timeline)."""
        if not self.enabled:
            yield
            return
        if torch.cuda.is_current_stream_capturing():
            with self._captured_span(label, row):
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((start, end))
        self._read()

    @contextmanager
    def _captured_span(self, label: str, row: int) -> Iterator[None]:
        from .ops.clock import span_end, span_start  # Triton: only on a GPU
        slot, self._captured = self._captured % self.MARKS, self._captured + 1
        self._labels[slot] = (label, row)
        span_start(self._marks, slot)
        yield
        span_end(self._marks, self._ends, slot, self._device_totals)

    def timeline(self) -> list[list]:
        """Where the last replay of each captured span ran: [label, start_us, duration_us, row] in start order, on
        the host's clock (time.time_ns, as PhaseClock's events; within a few microseconds: the offset is read
        around one kernel). Waits for a stream of its own only, so that work stuck behind a dead peer cannot hold
        it: for a trace's end, never for a step (a replay still running may show its spans half updated)."""
        if not self.enabled or not self._labels:
            return []
        from .ops.clock import device_now
        with torch.cuda.device(self.device), torch.cuda.stream(self._copies):  # copies wait for this stream alone
            now, done = torch.zeros(1, dtype=torch.int64, device=self.device), torch.cuda.Event()
            reads = []  # (host window, offset): the tightest of three (the first may compile the kernel: 0.3 s)
            for _ in range(3):
                before = time.time_ns()
                device_now(now)
                done.record()
                done.synchronize()
                after = time.time_ns()
                reads.append((after - before, now.cpu().item() - (before + after) // 2))
            offset = min(reads)[1]  # the device's clock less the host's
            starts, ends = torch.stack([self._marks, self._ends]).cpu().tolist()
        events = [[label, (starts[slot] - offset) / 1e3, (ends[slot] - starts[slot]) / 1e3, row]
                  for slot, (label, row) in self._labels.items() if ends[slot] > starts[slot] > 0]
        return sorted(events, key=lambda event: event[1])

    def _read(self) -> None:
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self.seconds += start.elapsed_time(end) / 1e3
            self.spans += 1

    def _read_device(self) -> tuple[float, int]:
        """The captured spans' counters as of the last copy that has finished; starts the next copy, on a stream
        of its own, so that nothing waits (a status answer lags the device by one read)."""
        if not self._captured:
            return 0.0, 0
        if self._snapshot is not None and self._snapshot[1].query():
            ns, spans = self._snapshot[0].tolist()
            self._device_read, self._snapshot = (ns / 1e9, spans), None
        if self._snapshot is None:
            host, done = torch.empty(2, dtype=torch.int64, pin_memory=True), torch.cuda.Event()
            with torch.cuda.stream(self._copies):
                host.copy_(self._device_totals, non_blocking=True)
                done.record()
            self._snapshot = (host, done)
        return self._device_read

    def totals(self) -> tuple[float, int]:
        """(busy seconds, spans) of the spans the GPU has finished."""
        self._read()
        seconds, spans = self._read_device()
        return self.seconds + seconds, self.spans + spans


def chrome_trace(node_events: dict[str, list[list]], gpu_events: dict[str, list[list]] | None = None) -> dict:
    """Chrome trace JSON (viewable in Perfetto): one process row per node, one thread per microbatch; with
    gpu_events, a row "<node> GPU" per node beside, one thread per microbatch (or expert lane)."""
    rows = {**node_events, **{f"{node} GPU": events for node, events in (gpu_events or {}).items() if events}}
    trace = []
    for pid, (node, events) in enumerate(sorted(rows.items())):
        trace.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": node}})
        for name, start_us, duration_us, microbatch in events:
            trace.append({"name": name, "ph": "X", "pid": pid, "tid": microbatch, "ts": start_us,
                          "dur": duration_us})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}
