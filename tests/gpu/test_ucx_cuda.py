"""The ucx transport between CUDA tensors: sent from device memory, received into device memory, bit-exact,
between two processes and between two endpoints of one process."""
import asyncio
import contextlib
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.unit.test_transport import free_ucx_port

from expertmesh.transport.base import TransportError
from expertmesh.transport.protocol import Combine, Dispatch

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


def ucx_address() -> str:
    return f"ucx://127.0.0.1:{free_ucx_port()}"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def cuda_transport():
    from expertmesh.transport.ucx import UcxTransport
    return UcxTransport(device="cuda")


ECHO_SERVER = """
import asyncio, sys
from expertmesh.transport import ucx
from expertmesh.transport.ucx import UcxTransport
ucx._PACK_CUDA = sys.argv[2:] == ["pack"]  # packed CUDA frames, when a test asks for them

async def main(address):
    listener = await UcxTransport(device="cuda").listen(address)
    print("ready", flush=True)
    while True:
        peer, message = await listener.recv()
        for tensor in message.tensors():
            assert tensor.is_cuda, f"received on {tensor.device}"
        await listener.send(peer, message)  # straight back from the device memory it arrived in

asyncio.run(main(sys.argv[1]))
"""


@contextlib.asynccontextmanager
async def echo_server_process(addr: str, pack: bool = False):
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", ECHO_SERVER, addr, *(["pack"] if pack else []),
                                                   stdout=asyncio.subprocess.PIPE, cwd=REPO)
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 120)
        assert line.strip() == b"ready", f"echo server said {line!r}, exit code {process.returncode}"
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def round_trips(conn, label: str) -> None:
    for dtype in [torch.bfloat16, torch.float32]:
        for rows in [3, 4096, 64 * 1024]:  # 64 K x 256 fp32 = 64 MiB
            source = torch.randn(rows, 256, device="cuda")
            hidden = (source * 3 + 1).to(dtype)  # just produced by kernels: the send must wait for them
            started = time.perf_counter()
            await conn.send(Combine(rows, 0, 0, hidden))
            back = await conn.recv(timeout_s=60)
            elapsed_s = time.perf_counter() - started
            assert back.partial.is_cuda, f"{label}: came back on {back.partial.device}"
            assert same_bits(back.partial, hidden), f"{label}: {dtype} x {rows} rows differ"
            if rows == 64 * 1024:
                print(f"{label} {dtype}: {hidden.nbytes >> 20} MiB round trip {elapsed_s * 1e3:.1f} ms, "
                      f"{2 * hidden.nbytes / elapsed_s / 1e9:.1f} GB/s")
    # several tensors, some on the host: all arrive on the device
    ids = torch.randint(0, 8, (100, 2), dtype=torch.int32)
    weights = torch.rand(100, 2, device="cuda")
    hidden = torch.randn(100, 64, device="cuda", dtype=torch.bfloat16)
    await conn.send(Dispatch(1, 2, 3, hidden, ids, weights))
    back = await conn.recv(timeout_s=30)
    assert all(t.is_cuda for t in back.tensors())
    assert same_bits(back.hidden, hidden) and same_bits(back.expert_weights, weights)
    assert torch.equal(back.expert_ids.cpu(), ids)


def test_cuda_tensors_between_two_processes():
    async def run():
        addr = ucx_address()
        async with echo_server_process(addr):
            conn = await cuda_transport().connect(addr)
            try:
                await round_trips(conn, "two processes")
            finally:
                await conn.close()

    asyncio.run(run())


def test_cuda_tensors_between_two_endpoints_of_one_process():
    async def run():
        transport = cuda_transport()
        addr = ucx_address()
        listener = await transport.listen(addr)

        async def echo():
            while True:
                peer, message = await listener.recv()
                await listener.send(peer, message)

        server = asyncio.create_task(echo())
        conn = await transport.connect(addr)
        try:
            await round_trips(conn, "one process")
        finally:
            server.cancel()
            await conn.close()
            await listener.close()

    asyncio.run(run())


def test_cuda_tensor_on_a_cpu_transport_is_refused():
    from expertmesh.transport.ucx import UcxTransport

    async def run():
        transport = UcxTransport(device="cpu")
        addr = ucx_address()
        listener = await transport.listen(addr)
        conn = await transport.connect(addr)
        try:
            with pytest.raises(TransportError, match="device='cuda'"):
                await conn.send(Combine(0, 0, 0, torch.ones(4, device="cuda")))
        finally:
            await conn.close()
            await listener.close()

    asyncio.run(run())


@pytest.mark.parametrize("pack", [False, True])
def test_dispatches_carved_from_one_cuda_buffer_round_trip_and_recycle(pack, monkeypatch):
    """M2N's Dispatches (hidden, ids, weights back to back in one device buffer) of decode and prefill sizes,
    their answers recycled into the receive pool as the attention node does: bit-exact every time, and with
    packed CUDA frames (ucx._PACK_CUDA, off by default until this test has passed on a GPU) the answer arrives
    in one buffer."""
    from expertmesh.transport import ucx
    from expertmesh.transport.protocol import TensorMeta, packed_offsets, packed_views
    monkeypatch.setattr(ucx, "_PACK_CUDA", pack)

    async def run():
        addr = ucx_address()
        async with echo_server_process(addr, pack):
            conn = await cuda_transport().connect(addr)
            try:
                for rows in [1, 256, 3000, 1, 256]:  # 3000 x 4096 bf16 is over the packed frame: frame per tensor
                    metas = [TensorMeta(torch.bfloat16, (rows, 4096)), TensorMeta(torch.int32, (rows, 2)),
                             TensorMeta(torch.float32, (rows, 2))]
                    flat = torch.empty(packed_offsets(metas)[1], dtype=torch.uint8, device="cuda")
                    sent = Dispatch(rows, 0, 0, *packed_views(flat, metas))
                    sent.hidden.copy_(torch.randn(rows, 4096, device="cuda"))
                    sent.expert_ids.copy_(torch.randint(0, 8, (rows, 2), device="cuda", dtype=torch.int32))
                    sent.expert_weights.copy_(torch.rand(rows, 2, device="cuda"))
                    await conn.send(sent)
                    back = await conn.recv(timeout_s=60)
                    assert all(same_bits(a, b) for a, b in zip(back.tensors(), sent.tensors())), rows
                    if ucx._PACK_CUDA and rows <= 256:
                        assert len({t.untyped_storage().data_ptr() for t in back.tensors()}) == 1
                    conn.recycle(back)
            finally:
                await conn.close()

    asyncio.run(run())

