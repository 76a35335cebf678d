"""Each `bench layer` row's time with other copies running at once over its time alone (cpu_concurrency.sh's JSON);
--rounds: the served rounds of 1+1 traces (plan_validation_cpu.sh's *_served.trace.json), dispatch to combine: their
median, which the model takes, and the mean of the slower of two draws, which a round to two expert nodes waits for.

    python benchmarks/cpu_concurrency.py /tmp/cpu_concurrency
    python benchmarks/cpu_concurrency.py --rounds benchmarks/planner/session15/mini_*_served.trace.json
    python benchmarks/cpu_concurrency.py --cores benchmarks/planner/session1{2_3,2_4,5}/mini_{1x1,1x2,2x2}.json

--cores: each served row's processes' CPU seconds (/proc) over its wall time: the cores they kept busy."""
from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path


def times(paths: list[Path]) -> dict[tuple[str, int], float]:
    """(part, tokens) -> median µs over the files."""
    rows: dict[tuple[str, int], list[float]] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            rows.setdefault((row["part"], row["tokens"]), []).append(row["us"])
    return {key: statistics.median(values) for key, values in rows.items()}


def rounds(trace_path: Path) -> list[float]:
    """Each served round's µs from its dispatch's start to its combine's end (served.phases_of's pairing)."""
    from expertmesh.planner import served
    nodes = served._node_events(json.loads(trace_path.read_text()))
    attention, expert = nodes["attention node 0"], nodes["expert node 0"]
    named = lambda events, name: [e for e in events if e[2] == name]  # noqa: E731
    computes = dict(served._next_after(named(attention, "dispatch"), named(expert, "expert_compute")))
    combines = dict(served._next_after(list(computes.values()), named(attention, "combine")))
    return [combines[c][0] + combines[c][1] - d[0] for d, c in computes.items() if c in combines]


def main() -> int:
    if sys.argv[1] == "--rounds":
        print("| trace | rounds | median µs | mean | slower of two (mean) |\n|---|---|---|---|---|")
        for path in map(Path, sys.argv[2:]):
            times = rounds(path)
            rng = random.Random(0)
            slower = statistics.mean(max(rng.choice(times), rng.choice(times)) for _ in range(20000))
            print(f"| {path.name} | {len(times)} | {statistics.median(times):.0f} | {statistics.mean(times):.0f} | "
                  f"{slower:.0f} |")
        return 0
    if sys.argv[1] == "--cores":
        print("| row | cores busy in all | each process |\n|---|---|---|")
        for path in map(Path, sys.argv[2:]):
            row = json.loads(path.read_text())["rows"][0]
            share = {name: cpu / row["duration_s"] for name, cpu in (row.get("cpu_s") or {}).items()}
            share["client"] = row.get("client_cpu_s", 0.0) / row["duration_s"]
            print(f"| {path.parent.name}/{path.stem} | {sum(share.values()):.2f} | "
                  + ", ".join(f"{name} {value:.2f}" for name, value in share.items()) + " |")
        return 0
    folder = Path(sys.argv[1])
    alone, together = times(sorted(folder.glob("alone_*.json"))), times(sorted(folder.glob("together_*.json")))
    print("| part | tokens | alone µs | together µs | ratio |\n|---|---|---|---|---|")
    for key in sorted(alone):
        print(f"| {key[0]} | {key[1]} | {alone[key]:.0f} | {together[key]:.0f} | {together[key] / alone[key]:.2f} |")
    ratios = [together[key] / alone[key] for key in alone]
    print(f"\nmedian ratio {statistics.median(ratios):.2f} over {len(ratios)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
