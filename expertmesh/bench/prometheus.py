"""Reads the gateway's /metrics text into {(metric, labels): value}, and derives what benchmarks report."""
from __future__ import annotations

import re

_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match is None:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match["labels"] or "")))
        samples[(match["name"], labels)] = float(match["value"])
    return samples


def value(text: str, metric: str, **labels: str) -> float | None:
    """One sample of a /metrics text, by name and labels; None when absent."""
    return parse(text).get((metric, tuple(sorted(labels.items()))))


def delta(after: dict, before: dict) -> dict:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def by_label(samples: dict, metric: str, *label_names: str) -> dict[tuple[str, ...], float]:
    """{(label values...): value} of one metric."""
    out = {}
    for (name, labels), value in samples.items():
        if name == metric:
            label_map = dict(labels)
            out[tuple(label_map.get(n, "") for n in label_names)] = value
    return out


def idle_fractions(samples_delta: dict) -> dict[str, float]:
    """Per node: 1 - (timed work) / (wall time), over the interval the delta covers."""
    work: dict[str, float] = {}
    for (node, _), seconds in by_label(samples_delta, "expertmesh_node_phase_seconds_total", "node", "phase").items():
        work[node] = work.get(node, 0.0) + seconds
    walls = by_label(samples_delta, "expertmesh_node_wall_seconds", "node")
    return {node: max(0.0, 1.0 - work.get(node, 0.0) / wall) for (node,), wall in walls.items() if wall > 0}


def gpu_busy(samples_delta: dict, duration_s: float) -> tuple[dict[str, float], dict[str, float]]:
    """Per node on a GPU: (device-busy fraction of duration_s, mean milliseconds per compute span), from the
    nodes' CUDA-event meters (expertmesh_node_gpu_*); nodes that timed no span are left out."""
    busy = by_label(samples_delta, "expertmesh_node_gpu_busy_seconds_total", "node")
    spans = by_label(samples_delta, "expertmesh_node_gpu_spans_total", "node")
    timed = {node: seconds for (node,), seconds in busy.items() if spans.get((node,), 0) > 0}
    return ({node: seconds / duration_s for node, seconds in timed.items()},
            {node: seconds * 1e3 / spans[(node,)] for node, seconds in timed.items()})
