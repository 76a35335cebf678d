"""UcxLinks (m2n/ucx_links.py) on their own, two ranks in one process (one UCX worker, endpoints to itself: the tags
keep the senders apart): messages land in the receive slots in order per microbatch, and what cannot go is refused
or times out with the rank named. Between processes, and a peer that dies: test_lockstep.py."""
from __future__ import annotations

import asyncio

import pytest
import torch

from expertmesh.m2n.ucx_links import UcxLinks
from expertmesh.transport.base import TransportError
from expertmesh.transport.protocol import TensorMeta

SLOT_BYTES = 4096


def _pair(timeout_s: float = 10.0) -> tuple[UcxLinks, UcxLinks]:
    """Rank 0 (attention) and rank 1 (expert), attached as the handshake attaches them."""
    attention = UcxLinks(1, 0, [1], 2, SLOT_BYTES, "cpu", timeout_s)
    expert = UcxLinks(1, 1, [0], 2, SLOT_BYTES, "cpu", timeout_s)
    attention.attach(1, expert.region_handle(0))
    expert.attach(0, attention.region_handle(1))
    return attention, expert


def _metas(tensors):
    return [TensorMeta(t.dtype, tuple(t.shape)) for t in tensors]


def test_messages_land_in_the_slots_in_order_per_microbatch():
    async def run():
        attention, expert = _pair()
        try:
            messages = [[torch.randn(3, 8).to(torch.bfloat16), torch.arange(6, dtype=torch.int32).view(3, 2) + i,
                         torch.rand(3, 2), torch.empty(0, 2)] for i in range(3)]
            # microbatch 0 twice (the second follows the first on its tag), microbatch 1 between them, received
            # before microbatch 0's first (across microbatches the order varies with timing)
            sent = attention.send(0, 1, messages[0]) + attention.send(1, 1, messages[1])
            attention.flush()
            for mb, message in [(1, messages[1]), (0, messages[0])]:
                views, works = expert.receive(mb, 0, _metas(message))
                await expert.wait(works)
                for got, want in zip(views, message):
                    assert torch.equal(got, want)
            sent += attention.send(0, 1, messages[2])
            attention.flush()  # sends and receives wait for a flush (or a wait on this side)
            views, works = expert.receive(0, 0, _metas(messages[2]))
            await expert.wait(works)
            await attention.wait(sent)
            assert all(torch.equal(got, want) for got, want in zip(views, messages[2]))
            # and back: an answer from the expert's slot view, as an echo would send it
            answer, works = attention.receive(0, 1, _metas(views[:1]))
            await expert.wait(expert.send(0, 0, views[:1]))
            await attention.wait(works)
            assert torch.equal(answer[0], messages[2][0])
        finally:
            attention.close()
            expert.close()

    asyncio.run(run())


def test_what_cannot_go_is_refused_or_times_out_naming_the_rank():
    async def run():
        attention, expert = _pair(timeout_s=0.3)
        unattached = UcxLinks(1, 0, [1, 2], 2, SLOT_BYTES, "cpu", 0.3)
        try:
            with pytest.raises(ValueError, match="slots hold 4096"):
                attention.send(0, 1, [torch.zeros(SLOT_BYTES + 1, dtype=torch.uint8)])
            with pytest.raises(ValueError, match="microbatch 2"):
                attention.send(2, 1, [torch.zeros(1)])
            with pytest.raises(RuntimeError, match="no ucx link to rank 2"):
                unattached.send(0, 2, [torch.zeros(1)])
            with pytest.raises(ValueError, match="rank 2 sent no UCX worker address"):
                unattached.attach(2, b"")
            _, works = expert.receive(1, 0, [TensorMeta(torch.float32, (4,))])  # nothing is ever sent
            with pytest.raises(TransportError, match=r"rank 1 got nothing from ranks \[0\] within 0.3 s"):
                await expert.wait(works)
        finally:
            for links in (attention, expert, unattached):
                links.close()

    asyncio.run(run())
