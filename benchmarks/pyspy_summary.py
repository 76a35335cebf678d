"""Where a node process's host time goes while it serves, from `py-spy record -f raw` (folded stacks).

Start-up (weights, warm-up, graph capture) is left out: only stacks through the serving loop, the control and
M2N tasks and the socket threads count. Prints each function's inclusive share of those samples (a function
counted once per stack), and the samples that poll the device (an event's query in a loop: the host waits there,
busy, for the GPU).

    python benchmarks/pyspy_summary.py attention.folded [--top 40] [--steps N --rate HZ]

--steps: the steps the node ran while recorded (bench serve's steps_per_node), with --rate (py-spy's sampling
rate, -r) to give host ms per step as well.
"""
import argparse
import collections
import re
from pathlib import Path

FRAME = re.compile(r"(.*?) \((.*?):(\d+)\)")
STARTUP = ("capture", "warm_up", "load_weights", "from_checkpoint", "_load")
SERVING = ("AttentionNode.serve", "ExpertNode.serve", "_SocketThread._run", "ModelRunner._forward", "Thread.run")
POLLING = ("host_tokens", "wait_event")
WRAPPERS = ("<module>", "_run_code", "_run_module_as_main", "run_node", "Runner.run", "run (__init__.py)",
            "run.<locals>.wrapper", "run_node.<locals>.guarded", "main (__main__.py)", "Thread._bootstrap")


def frame_name(frame: str) -> str:
    match = FRAME.match(frame)
    return f"{match.group(1)} ({Path(match.group(2)).name})" if match else frame


def summarize(path: Path, top: int, steps: int | None = None, rate: float = 100.0) -> str:
    inclusive, serving, polling, startup = collections.Counter(), 0, 0, 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [frame_name(f) for f in stack.split(";")]
        if any(word in f for f in frames for word in STARTUP):
            startup += int(count)
            continue
        if not any(word in f for f in frames for word in SERVING):
            continue
        serving += int(count)
        polling += int(count) * any(word in f for f in frames for word in POLLING)
        for name in set(frames):
            if not name.startswith(WRAPPERS):
                inclusive[name] += int(count)
    if not serving:
        return f"{path}: no serving samples ({startup} at start-up)"
    per_step = (lambda n: f" {n / rate * 1e3 / steps:7.3f} ms/step") if steps else (lambda n: "")
    lines = [f"{path}: {serving} serving samples ({startup} at start-up left out); polling the device "
             f"{polling / serving:.1%}"]
    for name, count in inclusive.most_common(top):
        lines.append(f"{count / serving:7.1%}{per_step(count)}  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folded", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rate", type=float, default=100.0)
    args = parser.parse_args()
    for path in args.folded:
        print(summarize(path, args.top, args.steps, args.rate))


if __name__ == "__main__":
    main()
