"""The soak's CI version: 15 s of mixed traffic (streams, plain requests, dropped streams, malformed requests)
against 2 attention and 2 expert nodes while a node is killed every 6 s: no request hangs, none is lost. (The
long soaks, minutes under 64 clients, are benchmarks/soak.py's, in RESULTS.md.)"""
from __future__ import annotations

import pytest

from tests.benchmark_script import load_benchmark

pytestmark = pytest.mark.slow


def test_fifteen_seconds_of_traffic_with_kills_hangs_and_loses_nothing(mixtral_dir):
    soak = load_benchmark("soak")
    report = soak.soak(str(mixtral_dir), duration_s=15, kill_every_s=6, concurrency=8)
    print(report)
    assert report["hung"] == 0 and report["lost"] == 0, report
    assert len(report["kills"]) == 2 and report["completed"] > 0
    assert report["rejected_as_malformed"] > 0  # malformed requests got their 4xx throughout
