"""CPU per token the gateway spends counting it (`generation_tokens`), in one gateway process and with several
sharing their counters through prometheus-client's multiprocess mode (gateway/metrics.py; RESULTS.md, thirteenth
session). Each mode runs in a fresh process: prometheus-client picks its value store at import.

    python benchmarks/gateway_counter_cost.py [--tokens 200000]"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_COUNT = """
import time
from expertmesh.gateway.metrics import GatewayMetrics
m = GatewayMetrics()
start = time.perf_counter()
for _ in range({tokens}):
    m.generation_tokens += 1
print((time.perf_counter() - start) / {tokens} * 1e6)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=200_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as shared:
        for name, extra in (("one process", {}), ("shared (several processes)", {"PROMETHEUS_MULTIPROC_DIR": shared})):
            env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | extra
            us = float(subprocess.run([sys.executable, "-c", _COUNT.format(tokens=args.tokens)], env=env,
                                      capture_output=True, text=True, check=True).stdout)
            print(f"{name:<28} {us:.2f} us per token counted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
