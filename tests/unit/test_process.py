"""A node process's boundary (expertmesh/process.py): what it sets before the node's main coroutine runs."""
from __future__ import annotations

import sys

import pytest

from expertmesh import process
from expertmesh.config import Config


def test_a_node_runs_at_the_short_switch_interval(tmp_path, monkeypatch):
    """Its transport's socket threads need the GIL to hand messages to the event loop: at the default 5 ms they
    waited that long while the loop's thread computed (benchmarks/RESULTS.md, issue 14)."""
    config = tmp_path / "cluster.json"
    Config().save(config)
    monkeypatch.setattr(sys, "argv", ["node", "--config", str(config)])
    default = sys.getswitchinterval()
    seen = []

    async def main(config: Config, index: int) -> None:
        seen.append(sys.getswitchinterval())

    try:
        process.run_node("test node", main)
    finally:
        sys.setswitchinterval(default)
    assert seen == [pytest.approx(process.SWITCH_INTERVAL_S)] and process.SWITCH_INTERVAL_S < default
