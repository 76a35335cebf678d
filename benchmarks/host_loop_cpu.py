"""The attention node's host loop per step, with a forward pass that costs nothing: what a GPU's whole-step graph
replays leave on the host at N sequences in flight.

The real AttentionNode (control coroutine, engine loop, async scheduling's held tokens, StepOutputs over zmq)
serves a client (another process, as a gateway is) that keeps N requests in flight over its control socket. Its runner returns
logits at once, so a step takes what the host does around it: the scheduler, sampling, the advance of every
sequence, the outputs, the requests coming and going. Prints steps/s and host µs per step; the node runs in this
process, so `py-spy record -p <pid>` (printed) shows where that goes.

    python benchmarks/host_loop_cpu.py --seqs 64 256 --seconds 5
"""
import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from expertmesh.attention_node.node import AttentionNode  # noqa: E402
from expertmesh.attention_node.scheduler import Scheduler  # noqa: E402
from expertmesh.config import Config  # noqa: E402
from expertmesh.kv.block_manager import BlockManager  # noqa: E402
from expertmesh.launcher.local import free_port  # noqa: E402
from expertmesh.telemetry import GpuMeter, PhaseClock  # noqa: E402
from expertmesh.transport.protocol import AddRequest, SamplingParams, StepOutputs  # noqa: E402
from expertmesh.transport.zmq import ZmqTransport  # noqa: E402

VOCAB = 256  # the argmax over it is device work on a GPU: kept small here, so that the host's part shows


class InstantRunner:
    """ModelRunner's face to the node loop, with a forward that returns its logits at once (token 1 wins)."""

    def __init__(self) -> None:
        self.clock, self.gpu, self.eager_steps, self.held_tokens = PhaseClock(), GpuMeter(None), 0, None
        self.logits = torch.zeros(4096, VOCAB)
        self.logits[:, 1] = 1.0

    async def forward(self, step, seqs, microbatches, end_step=True):
        await asyncio.sleep(0)  # as a GPU step does (its plan to the expert nodes is awaited): the control runs
        return self.logits[:len(seqs)]

    async def finish_step(self, step):
        await asyncio.sleep(0)  # a GPU step's rounds are polled for: the control runs meanwhile


async def client(address: str, seqs: int, prompt_len: int, output_len: int, stop) -> None:
    """A gateway's part, in a process of its own: keeps `seqs` requests in flight, a new one for each finished."""
    connection = await ZmqTransport().connect(address)
    sampling = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True).to_list()
    sent = 0
    for sent in range(seqs):
        await connection.send(AddRequest(f"r{sent}", list(range(2, 2 + prompt_len)), sampling))
    while not stop.is_set():
        try:
            message = await asyncio.wait_for(connection.recv(), 0.5)
        except asyncio.TimeoutError:
            continue
        for reason in message.finish_reasons if isinstance(message, StepOutputs) else ():
            if reason is not None:
                sent += 1
                await connection.send(AddRequest(f"r{sent}", list(range(2, 2 + prompt_len)), sampling))
    await connection.close()


def client_process(address: str, seqs: int, prompt_len: int, output_len: int, stop) -> None:
    asyncio.run(client(address, seqs, prompt_len, output_len, stop))


async def run(seqs: int, seconds: float, prompt_len: int, output_len: int) -> dict:
    config = Config()
    config.engine.async_scheduling = True  # the loop a GPU runs
    address = f"tcp://127.0.0.1:{free_port()}"
    blocks = seqs * -(-(prompt_len + output_len) // 16) + 16
    scheduler = Scheduler(BlockManager(blocks, 16), seqs, 2048, prompt_len + output_len + 16, eos_token_ids=(0,))
    spec = type("Spec", (), {"vocab_size": VOCAB})()
    node = AttentionNode(0, config, spec, InstantRunner(), scheduler, None, await ZmqTransport().listen(address))
    serving = asyncio.create_task(node.serve())
    stop = multiprocessing.Event()
    gateway = multiprocessing.Process(target=client_process, args=(address, seqs, prompt_len, output_len, stop))
    gateway.start()
    try:
        while node.generated_tokens < 2 * seqs * output_len:  # past two waves' ramp: steady state from here
            await asyncio.sleep(0.05)
        steps, tokens, cpu, started = node.step, node.generated_tokens, time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        steps, tokens = node.step - steps, node.generated_tokens - tokens
        cpu, elapsed = time.process_time() - cpu, time.perf_counter() - started
    finally:
        stop.set()
        gateway.join(10)
        serving.cancel()
        await node.control.close()
    return {"us_per_step": elapsed / steps * 1e6, "tokens_per_step": tokens / steps, "cpu_share": cpu / elapsed}


def main() -> int:
    torch.set_num_threads(1)  # the stand-in argmax is device work on a GPU: no thread pool's wake-ups here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 256])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    print(f"pid {os.getpid()}", flush=True)
    for n in args.seqs:
        runs = [asyncio.run(run(n, args.seconds, args.prompt_len, args.output_len)) for _ in range(args.repeat)]
        us = statistics.median(r["us_per_step"] for r in runs)
        per_step = statistics.median(r["tokens_per_step"] for r in runs)
        cpu = statistics.median(r["cpu_share"] for r in runs)
        print(f"{n} in flight: host {us:.0f} µs per step, {us / per_step:.1f} µs per token "
              f"({per_step:.0f} tokens a step; the node's process {cpu:.0%} busy)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
