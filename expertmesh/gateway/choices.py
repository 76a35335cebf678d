"""`n` and `best_of`: several samples of one prompt, generated as independent requests (vLLM: separate sequences
sharing the prompt) and returned as the choices of one response, streamed or whole."""
from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import Any, AsyncIterator, Sequence

from ..transport.protocol import SamplingParams


def sample_params(sampling: SamplingParams, count: int, ranked: bool) -> list[SamplingParams]:
    """The SamplingParams of each of count samples. Sample i of a seeded request draws with seed + i (vLLM's), of an
    unseeded one from a random base, so that samples differ (and any one is replayed by its seed). Ranked samples
    (best_of > n) return each token's logprob, the ranking's key."""
    if count == 1:
        return [sampling]
    base = sampling.seed if sampling.seed is not None else random.getrandbits(63)
    logprobs = 0 if ranked and sampling.logprobs is None else sampling.logprobs
    return [dataclasses.replace(sampling, seed=(base + i + 2**63) % 2**64 - 2**63, logprobs=logprobs)  # int64 wrap
            for i in range(count)]


def best(outputs: Sequence[Any], n: int) -> list[Any]:
    """The n outputs of highest cumulative logprob (each output's .logprobs: [[logprob, top], ...]), best first."""
    return sorted(outputs, key=lambda o: -sum(entry[0] for entry in o.logprobs))[:n]


_END = object()


async def interleave(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several streams as they come, each with its stream's index. A stream that fails fails the whole, and
    the others are cancelled, as they are when the consumer stops early. One stream is passed through as it is."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:  # owns its stream: cancelling it closes it
        try:
            async for item in stream:
                queue.put_nowait((index, item, None))
        except Exception as exc:
            queue.put_nowait((index, None, exc))
        else:
            queue.put_nowait((index, _END, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
