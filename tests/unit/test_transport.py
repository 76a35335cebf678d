"""Conformance of every transport backend: order, many tensors, empty messages, dtypes, concurrent
senders, and a bounded wait when the peer is gone."""
import asyncio

import pytest
import torch

from expertmesh.launcher.local import free_port
from expertmesh.transport.base import TransportError, make_transport
from expertmesh.transport.protocol import Combine, Dispatch

BACKENDS = ["inproc", "zmq", "ucx"]


def address(backend: str, name: str) -> str:
    if backend == "inproc":
        return f"inproc://{name}"
    scheme = "ucx" if backend == "ucx" else "tcp"
    return f"{scheme}://127.0.0.1:{free_port()}"


async def echo_server(listener):
    while True:
        peer, message = await listener.recv()
        await listener.send(peer, message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_many_tensors_dtypes_and_concurrent_senders(backend):
    async def run():
        transport = make_transport(backend)
        addr = address(backend, "conformance")
        listener = await transport.listen(addr)
        server = asyncio.create_task(echo_server(listener))
        conns = [await transport.connect(addr) for _ in range(3)]
        dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64]

        async def talk(sender: int, conn):
            sent = []
            for i in range(20):
                dtype = dtypes[i % len(dtypes)]
                hidden = (torch.randn(i, 8) * 10).to(dtype)  # i = 0: an empty tensor
                msg = Dispatch(sender, i, 0, hidden, torch.full((i, 2), i, dtype=torch.int32), torch.rand(i, 2))
                sent.append(msg)
                await conn.send(msg)
            for msg in sent:  # replies come back in order
                back = await conn.recv(timeout_s=10)
                assert (back.step, back.layer) == (msg.step, msg.layer)
                assert back.hidden.dtype == msg.hidden.dtype and torch.equal(back.hidden, msg.hidden)
                assert torch.equal(back.expert_ids, msg.expert_ids)

        await asyncio.gather(*(talk(s, c) for s, c in enumerate(conns)))
        server.cancel()
        for conn in conns:
            await conn.close()
        await listener.close()

    asyncio.run(run())


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_message(backend):
    async def run():
        transport = make_transport(backend)
        addr = address(backend, "large")
        listener = await transport.listen(addr)
        server = asyncio.create_task(echo_server(listener))
        conn = await transport.connect(addr)
        big = torch.randn(64 * 1024, 64)  # 16 MiB
        await conn.send(Combine(1, 2, 3, big))
        back = await conn.recv(timeout_s=30)
        assert torch.equal(back.partial, big)
        server.cancel()
        await conn.close()
        await listener.close()

    asyncio.run(run())


@pytest.mark.parametrize("backend", BACKENDS)
def test_silent_peer_gives_error_not_hang(backend):
    async def run():
        transport = make_transport(backend)
        addr = address(backend, "silent")
        listener = await transport.listen(addr)  # never answers
        conn = await transport.connect(addr)
        await conn.send(Combine(1, 0, 0, torch.zeros(1, 4)))
        with pytest.raises(TransportError, match="within 0.2 s"):
            await conn.recv(timeout_s=0.2)
        await conn.close()
        await listener.close()

    asyncio.run(run())


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown transport backend 'carrier-pigeon'"):
        make_transport("carrier-pigeon")
