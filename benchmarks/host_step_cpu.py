"""The attention node's host work per decode step, model compute left out: what a GPU waits on between steps.

A running batch of N decoding sequences (greedy, the shipped model's vocabulary) goes through the parts of a step
that run on the host: the scheduler's pick, the step's inputs and metadata (what a CUDA-graph replay loads),
the sampling batch, the advance of every sequence and the StepOutputs message. The argmax itself is device work
on a GPU, so it is timed apart. Each part's median over the steps, best of --repeat runs (this machine is shared).

    python benchmarks/host_step_cpu.py --seqs 64 256 --repeat 3
"""
import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from expertmesh.attention_node.sampler import sample_step, sampling_batch  # noqa: E402
from expertmesh.attention_node.scheduler import Sequence  # noqa: E402
from expertmesh.transport.protocol import SamplingParams, StepOutputs, encode_frames  # noqa: E402
from tests.inproc_cluster import InprocCluster  # noqa: E402

PARTS = ("schedule", "step_inputs", "sampling_batch", "advance", "encode", "argmax (device work on a GPU)")


async def one_run(seqs_n: int, steps: int) -> dict[str, float]:
    context = 2048
    async with InprocCluster(ROOT / "models" / "expertmesh-mini", num_expert_nodes=0, max_len=context,
                             max_num_seqs=seqs_n) as cluster:
        scheduler, runner = cluster.scheduler, cluster.runner
        for i in range(seqs_n):
            scheduler.add(Sequence(f"r{i}", list(range(1, 101)), SamplingParams(max_tokens=context - 200,
                                                                                  temperature=0.0,
                                                                                  ignore_eos=True), i))
        # admitted and "prefilled" (in chunks of the token budget): every sequence decodes from here on
        while scheduler.waiting or any(not s.output_ids for s in scheduler.running):
            for seq in scheduler.schedule():
                if not seq.output_ids:
                    scheduler.advance(seq, 5)
        logits = torch.randn(seqs_n, cluster.spec.vocab_size)
        width = context // cluster.block_size
        eos = tuple(scheduler.eos_token_ids)
        times: dict[str, list[float]] = {part: [] for part in PARTS}
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = scheduler.schedule()
            t1 = time.perf_counter()
            runner.step_inputs(batch, pad_to=(seqs_n, seqs_n), table_width=width)
            t2 = time.perf_counter()
            sampling_batch(batch, "cpu", cluster.spec.vocab_size, eos)
            t3 = time.perf_counter()
            tokens, logprobs = sample_step(logits, batch, eos)
            t4 = time.perf_counter()
            reasons = [scheduler.advance(seq, token) for seq, token in zip(batch, tokens)]
            t5 = time.perf_counter()
            none = [None] * len(batch)
            encode_frames(StepOutputs([s.request_id for s in batch], tokens, reasons, none, logprobs, none, none))
            t6 = time.perf_counter()
            # sample_step = sampling_batch + argmax + .tolist(): its argmax is what is left after the batch
            for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5, (t4 - t3) - (t3 - t2))):
                times[part].append(seconds)
        return {part: statistics.median(values) for part, values in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    for n in args.seqs:
        runs = [asyncio.run(one_run(n, args.steps)) for _ in range(args.repeat)]
        best = {part: min(run[part] for run in runs) for part in PARTS}
        host = sum(v for part, v in best.items() if not part.startswith("argmax"))
        print(f"{n} sequences: host {host * 1e6:.0f} µs per step (" +
              ", ".join(f"{part} {v * 1e6:.0f}" for part, v in best.items()) + " µs)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
