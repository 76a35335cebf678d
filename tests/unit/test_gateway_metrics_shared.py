"""Several gateway processes share their /metrics counters and histograms (gateway/metrics.py): whichever answers a
scrape reports the sums of all, and a dead process's in-flight requests leave the gauge while its counts stay (the
launcher marks it dead before restarting it)."""
from __future__ import annotations

import os
import subprocess
import sys

from expertmesh.bench import prometheus

_WORKER = """
from expertmesh.gateway.metrics import GatewayMetrics
m = GatewayMetrics()
m.in_flight += {in_flight}
m.requests["completed"] += {completed}
m.generation_tokens += {tokens}
m.observe(0.02, 0.5, {tokens})
import os; print(os.getpid())
"""


def test_processes_sharing_a_directory_are_summed_and_a_dead_ones_in_flight_leaves(tmp_path, monkeypatch):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    pids = [int(subprocess.run([sys.executable, "-c", _WORKER.format(in_flight=n, completed=2 * n, tokens=10 * n)],
                               env=env, capture_output=True, text=True, check=True).stdout) for n in (1, 3)]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from expertmesh.gateway.metrics import GatewayMetrics
    text = GatewayMetrics().render([], []).decode()  # a third process's scrape (this one, nothing of its own)
    assert prometheus.value(text, "expertmesh_requests_total", outcome="completed") == 8
    assert prometheus.value(text, "expertmesh_generation_tokens_total") == 40
    assert prometheus.value(text, "expertmesh_time_to_first_token_seconds_count") == 2
    assert prometheus.value(text, "expertmesh_requests_in_flight") == 4
    from prometheus_client.multiprocess import mark_process_dead
    mark_process_dead(pids[1], str(tmp_path))
    text = GatewayMetrics().render([], []).decode()
    assert prometheus.value(text, "expertmesh_requests_in_flight") == 1
    assert prometheus.value(text, "expertmesh_requests_total", outcome="completed") == 8
