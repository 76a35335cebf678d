"""Each part of a colocated decode step's forward pass as served, beside `bench layer`'s time for the same part: the
check that the planner's CPU calibration times what a served step runs.

The model runs in this process (tests/inproc_cluster.py's cluster, colocated, float32, one thread): N sequences of
random prompts (as `bench serve` draws them; one prompt for all would route every token to the same experts) decode
together, and each part is timed inside ModelRunner.forward. Then `bench layer` times the same parts.

    python benchmarks/forward_parts_cpu.py --model models/expertmesh-mini --seqs 16
"""
import argparse
import asyncio
import collections
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import expertmesh.attention_node.model_runner as model_runner  # noqa: E402
from expertmesh.attention_node.scheduler import Sequence  # noqa: E402
from expertmesh.bench.layer import bench_attention, bench_experts  # noqa: E402
from expertmesh.model.spec import ModelSpec  # noqa: E402
from expertmesh.transport.protocol import SamplingParams  # noqa: E402
from tests.inproc_cluster import InprocCluster  # noqa: E402

PARTS = ("rms_norm", "self_attention", "add_rms_norm", "route_and_share", "fused_moe")  # as model_runner calls them


async def served_parts(model: Path, seqs: int, prompt_len: int, steps: int) -> tuple[float, dict[str, float]]:
    """(forward ms, µs per layer of each part) over `steps` decode steps, after two to warm up."""
    spent = collections.defaultdict(float)
    for name in PARTS:
        def timed(*args, _op=getattr(model_runner, name), _name=name, **kwargs):
            start = time.perf_counter()
            out = _op(*args, **kwargs)
            spent[_name] += time.perf_counter() - start
            return out
        setattr(model_runner, name, timed)
    rng = random.Random(0)
    async with InprocCluster(model, num_expert_nodes=0, device="cpu", dtype=torch.float32,
                             max_num_seqs=seqs) as cluster:
        for i in range(seqs):
            cluster.scheduler.add(Sequence(f"s{i}", [rng.randrange(10, 256) for _ in range(prompt_len)],
                                           SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True), 0))
        total = 0.0
        for step in range(steps + 3):  # the first step prefills; two decode steps warm up
            batch = cluster.scheduler.schedule()
            if step == 3:
                spent.clear()
                total = 0.0
            start = time.perf_counter()
            logits = await cluster.runner.forward(step, batch, 1)
            total += time.perf_counter() - start
            for seq, token in zip(batch, logits.argmax(-1).tolist()):
                cluster.scheduler.advance(seq, token)
        layers = steps * cluster.spec.num_layers
    return total / steps * 1e3, {name: seconds / layers * 1e6 for name, seconds in spent.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/expertmesh-mini")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)  # as a node process (config.model.torch_threads)
    forward_ms, parts = asyncio.run(served_parts(args.model, args.seqs, args.prompt_len, args.steps))
    spec = ModelSpec.from_dir(args.model)
    context = args.prompt_len + args.steps // 2
    attention = bench_attention(spec, args.model.name, args.seqs, context, "cpu", torch.float32, 1e10, 1e11)[0].us
    experts = bench_experts(spec, args.model.name, args.seqs, "cpu", torch.float32, 1e10, 1e11, ("reference",))[0].us
    served_attention = sum(us for name, us in parts.items() if name != "fused_moe")
    print(f"forward, served in this process: {forward_ms:.2f} ms ({spec.num_layers} layers, {args.seqs} sequences)")
    print(f"per layer, served: attention side {served_attention:.0f} us, experts {parts['fused_moe']:.0f} us "
          f"({', '.join(f'{name} {us:.0f}' for name, us in parts.items())})")
    print(f"per layer, bench layer: attention side {attention:.0f} us, experts {experts:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
