"""Conformance of every transport backend: order, many tensors, empty messages, every dtype, large messages,
concurrent senders, and a bounded wait (or an error) when the peer is silent, gone or killed."""
import asyncio
import contextlib
import dataclasses
import random
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from expertmesh.launcher.local import free_port
from expertmesh.transport.base import TransportError, make_transport
from expertmesh.transport.protocol import (_DTYPES, Combine, Dispatch, ExpertError, HelloReply, Message,
                                           StatusRequest)

BACKENDS = ["inproc", "zmq", "ucx"]
SOCKET_BACKENDS = ["zmq", "ucx"]  # real peers in other processes, messages of hundreds of MB
# The core tests also run ucx with the event loop progressing UCX ("ucx-polling": backend-progress mode).
CORE_BACKENDS = BACKENDS + ["ucx-polling"]
UCX_MODES = ["ucx", "ucx-polling"]
REPO = Path(__file__).resolve().parents[2]


def free_ucx_port() -> int:
    """A free port below the kernel's ephemeral range: when UCX starts, its TCP transport binds ephemeral
    ports of its own and can take the very port free_port() just found free."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, ephemeral_low)
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 10000..{ephemeral_low}")


def make(backend: str):
    """make_transport, where "ucx-polling" is ucx in progress mode polling."""
    name, _, ucx_progress_mode = backend.partition("-")
    return make_transport(name, ucx_progress_mode=ucx_progress_mode or "thread")


def address(backend: str, name: str) -> str:
    if backend == "inproc":
        return f"inproc://{name}"
    if backend.startswith("ucx"):
        return f"ucx://127.0.0.1:{free_ucx_port()}"
    return f"tcp://127.0.0.1:{free_port()}"


async def echo_server(listener):
    while True:
        peer, message = await listener.recv()
        await listener.send(peer, message)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_order_many_tensors_dtypes_and_concurrent_senders(backend):
    async def run():
        transport = make(backend)
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


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_large_message(backend):
    async def run():
        transport = make(backend)
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


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_silent_peer_gives_error_not_hang(backend):
    async def run():
        transport = make(backend)
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


# ---- more conformance: every backend ------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def echo_link(backend: str, name: str):
    """A listener that echoes every message, and one connection to it; everything closed on the way out."""
    transport = make(backend)
    addr = address(backend, name)
    listener = await transport.listen(addr)
    server = asyncio.create_task(echo_server(listener))
    conn = None
    try:
        conn = await transport.connect(addr)
        yield conn
    finally:
        server.cancel()
        if conn is not None:
            await conn.close()
        await listener.close()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of any dtype (NaNs and subnormals included), so equality is checked bit for bit."""
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for dim in shape:
        numel *= dim
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_every_dtype_bit_exact(backend):
    async def run():
        async with echo_link(backend, "dtypes") as conn:
            sent = []
            for i, dtype in enumerate(_DTYPES):
                for shape in [(3, 5), (512, 160)]:  # one frame with the header, and a frame of its own (ucx)
                    sent.append(Combine(i, shape[0], 0, random_tensor(dtype, shape, seed=i)))
                    await conn.send(sent[-1])
            for msg in sent:
                back = await conn.recv(timeout_s=10)
                assert (back.step, back.layer) == (msg.step, msg.layer)
                assert same_bits(back.partial, msg.partial), msg.partial.dtype

    asyncio.run(run())


@pytest.mark.parametrize("backend", BACKENDS)
def test_recycled_receive_memory_takes_later_messages(backend):
    """What a receiver recycles, ucx reuses for later messages of sizes that fit (M2N brings the same sizes
    every layer): four messages land in at most two buffers, and the content is always the new message's.
    Other backends may ignore recycle."""
    async def run():
        async with echo_link(backend, "recycle") as conn:
            memory = set()
            for i, (dtype, shape) in enumerate([(torch.float32, (256, 160)), (torch.float32, (256, 160)),
                                                (torch.bfloat16, (400, 200)), (torch.float32, (128, 160))]):
                message = Combine(i, 0, 0, random_tensor(dtype, shape, seed=i))  # over 64 KiB: not inline
                await conn.send(message)
                back = await conn.recv(timeout_s=10)
                assert same_bits(back.partial, message.partial)
                memory.add(back.partial.untyped_storage().data_ptr())
                conn.recycle(back)
            if backend.startswith("ucx"):
                assert len(memory) <= 2, memory

    asyncio.run(run())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_messages(backend):
    async def run():
        async with echo_link(backend, "empty") as conn:
            empty = torch.zeros(0, dtype=torch.int32)
            sent = [StatusRequest(),  # no fields at all
                    ExpertError(1, 2, 3, "scalars only"),
                    Combine(1, 0, 0, torch.empty(0, 8)),  # zero-size tensors
                    Combine(2, 0, 0, torch.empty(4, 0, 2, dtype=torch.bfloat16)),
                    Dispatch(3, 0, 0, torch.empty(0, 8), empty.reshape(0, 2), torch.empty(0, 2)),
                    Combine(4, 0, 0, torch.tensor(3.5)),  # 0-dim
                    StatusRequest()]
            for msg in sent:
                await conn.send(msg)
            for msg in sent:
                back = await conn.recv(timeout_s=10)
                assert type(back) is type(msg)
                for got, want in zip(back.tensors(), msg.tensors()):
                    assert same_bits(got, want)
                scalars = [f.name for f in dataclasses.fields(msg) if f.name not in msg._tensor_fields]
                assert [getattr(back, f) for f in scalars] == [getattr(msg, f) for f in scalars]

    asyncio.run(run())


ManyTensors = dataclasses.make_dataclass(
    "ManyTensors", [("label", str)] + [(f"t{i}", torch.Tensor) for i in range(24)],
    bases=(Message,), namespace={"TAG": 9001})


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors_per_message_and_long_header(backend):
    async def run():
        async with echo_link(backend, "many") as conn:
            # sizes from empty to 256 KiB, so one message mixes bytes inline with the header and frames of their own
            tensors = [random_tensor(_DTYPES[i % 5], (i * i * 7 % 300, 64 * (i % 4)), seed=i) for i in range(24)]
            many = ManyTensors("many", *tensors)
            long_header = HelloReply(7, list(range(30000)))  # a header of ~90 KB
            for msg in [many, long_header, many]:
                await conn.send(msg)
            for want in [many, long_header, many]:
                back = await conn.recv(timeout_s=10)
                assert type(back) is type(want)
                assert all(same_bits(a, b) for a, b in zip(back.tensors(), want.tensors()))
            assert back.label == "many"

    asyncio.run(run())


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_concurrent_senders_on_one_connection(backend):
    """Messages of coroutines sharing a connection must not interleave, and each one's order must hold."""
    async def run():
        async with echo_link(backend, "shared") as conn:
            senders, per_sender = 8, 6

            async def talk(sender: int) -> None:
                for i in range(per_sender):
                    rows = 800 if (sender + i) % 2 else 3  # 800 x 64 fp32 = 200 KiB: several frames per message
                    hidden = torch.full((rows, 64), float(sender * 100 + i))
                    await conn.send(Dispatch(sender, i, 0, hidden, torch.full((rows, 2), i, dtype=torch.int32),
                                             torch.full((rows, 2), float(sender))))

            await asyncio.gather(*(talk(s) for s in range(senders)))
            next_of = [0] * senders
            for _ in range(senders * per_sender):
                back = await conn.recv(timeout_s=10)
                sender, i = back.step, back.layer
                assert i == next_of[sender], f"sender {sender}: message {i} came before {next_of[sender]}"
                next_of[sender] += 1
                assert torch.all(back.hidden == sender * 100 + i)
                assert torch.all(back.expert_ids == i) and torch.all(back.expert_weights == sender)
            assert next_of == [per_sender] * senders

    asyncio.run(run())


# ---- real peers in other processes: large messages, peers that die --------------------------------------------

@pytest.mark.parametrize("backend", SOCKET_BACKENDS)
def test_256_mib_round_trip(backend):
    async def run():
        async with echo_link(backend, "huge") as conn:
            huge = torch.arange(64 << 20, dtype=torch.int32)  # 256 MiB
            await conn.send(Combine(1, 2, 3, huge))
            back = await conn.recv(timeout_s=60)
            assert back.partial.nbytes == 256 << 20 and torch.equal(back.partial, huge)

    asyncio.run(run())


PEER_SCRIPT = """
import asyncio, sys
import torch
from expertmesh.transport.base import make_transport
from expertmesh.transport.protocol import Combine

async def main(role, backend, address):
    name, _, ucx_progress_mode = backend.partition("-")
    transport = make_transport(name, ucx_progress_mode=ucx_progress_mode or "thread")
    if role == "server":  # echo everything
        listener = await transport.listen(address)
        print("ready", flush=True)
        while True:
            peer, message = await listener.recv()
            await listener.send(peer, message)
    else:  # say hello, then wait to be killed
        conn = await transport.connect(address)
        await conn.send(Combine(7, 0, 0, torch.ones(2, 2)))
        print("ready", flush=True)
        await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


@contextlib.asynccontextmanager
async def peer_process(role: str, backend: str, addr: str):
    """A peer in its own process, running until the test kills it (and killed on the way out regardless)."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", PEER_SCRIPT, role, backend, addr,
                                                   stdout=asyncio.subprocess.PIPE, cwd=REPO)
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line.strip() == b"ready", f"peer process said {line!r}, exit code {process.returncode}"
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def kill(process) -> None:
    process.send_signal(signal.SIGKILL)


@pytest.mark.parametrize("backend", SOCKET_BACKENDS + ["ucx-polling"])
def test_killed_peer_gives_error_within_bound(backend):
    """A recv pending when the serving process dies ends in TransportError: ucx notices the lost endpoint
    at once; zmq's recv cannot tell (the recv timeout bounds the wait), but its connection reports the loss at once
    to whoever asked (on_peer_lost)."""
    async def run():
        addr = address(backend, "killed")
        async with peer_process("server", backend, addr) as server:
            conn = await make(backend).connect(addr)
            lost = asyncio.Event()
            conn.on_peer_lost(lost.set)
            try:
                await conn.send(Combine(1, 0, 0, torch.ones(4)))
                assert torch.equal((await conn.recv(timeout_s=30)).partial, torch.ones(4))
                pending = asyncio.create_task(conn.recv(timeout_s=3))
                await asyncio.sleep(0)  # the recv is waiting before the peer dies
                kill(server)
                started = time.monotonic()
                if backend == "zmq":
                    await asyncio.wait_for(lost.wait(), 1)
                with pytest.raises(TransportError) as error:
                    await asyncio.wait_for(pending, 10)
                waited_s = time.monotonic() - started
                assert waited_s < 5, f"{backend}: the error took {waited_s:.1f} s"
                if backend.startswith("ucx"):
                    assert "peer lost" in str(error.value) and waited_s < 2.5, (waited_s, error.value)
                    with pytest.raises(TransportError):  # the link stays dead
                        await conn.send(Combine(2, 0, 0, torch.ones(4)))
                    with pytest.raises(TransportError, match="peer lost"):
                        await conn.recv(timeout_s=1)
            finally:
                await conn.close()

    asyncio.run(run())


@pytest.mark.parametrize("backend", UCX_MODES)
def test_ucx_listener_drops_a_killed_peer_and_serves_others(backend):
    async def run():
        transport = make(backend)
        addr = address(backend, "drop")
        listener = await transport.listen(addr)
        try:
            async with peer_process("client", backend, addr) as client:
                peer, hello = await asyncio.wait_for(listener.recv(), 30)
                assert hello.step == 7
                kill(client)

                async def until_send_fails() -> TransportError:
                    while True:  # answers may still go out until UCX has noticed the loss
                        try:
                            await listener.send(peer, Combine(0, 0, 0, torch.ones(1)))
                        except TransportError as exc:
                            return exc
                        await asyncio.sleep(0.01)

                error = await asyncio.wait_for(until_send_fails(), 5)
                assert f"no peer {peer!r}" in str(error) or "gone" in str(error)
            conn = await transport.connect(addr)  # the listener still serves
            try:
                await conn.send(Combine(8, 0, 0, torch.ones(1)))
                other, message = await asyncio.wait_for(listener.recv(), 10)
                assert other != peer and message.step == 8
            finally:
                await conn.close()
        finally:
            await listener.close()

    asyncio.run(run())


# ---- ucx specifics and errors ---------------------------------------------------------------------------------

def test_ucx_connect_to_nothing_fails_in_time():
    from expertmesh.transport.ucx import UcxTransport

    async def run():
        addr = address("ucx", "nothing")
        started = time.monotonic()
        with pytest.raises(TransportError, match=f"cannot connect to {addr}"):
            await UcxTransport(connect_timeout_s=2).connect(addr)
        assert time.monotonic() - started < 4

    asyncio.run(run())


def test_ucx_connect_within_waits_for_a_late_listener():
    """Attention nodes start before expert nodes listen: failed attempts must leave nothing broken behind."""
    from expertmesh.transport.base import connect_within

    async def run():
        transport = make_transport("ucx")
        addr = address("ucx", "late")
        failures = 0
        first_failure = asyncio.Event()

        class CountingTransport:
            async def connect(self, address: str):
                nonlocal failures
                try:
                    return await transport.connect(address)
                except TransportError:
                    failures += 1
                    first_failure.set()
                    raise

        connecting = asyncio.create_task(connect_within(CountingTransport(), addr, 30))
        await asyncio.wait_for(first_failure.wait(), 10)
        listener = await transport.listen(addr)
        server = asyncio.create_task(echo_server(listener))
        conn = await asyncio.wait_for(connecting, 30)
        try:
            assert failures >= 1
            await conn.send(Combine(5, 0, 0, torch.ones(3)))
            assert (await conn.recv(timeout_s=10)).step == 5
        finally:
            server.cancel()
            await conn.close()
            await listener.close()

    asyncio.run(run())


@pytest.mark.parametrize("backend", SOCKET_BACKENDS)
def test_listen_on_a_busy_port_names_the_address(backend):
    async def run():
        with socket.socket() as sock:
            sock.bind(("0.0.0.0", 0))
            sock.listen()
            scheme = "ucx" if backend == "ucx" else "tcp"
            addr = f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
            with pytest.raises(TransportError, match=f"cannot listen on {addr}"):
                await make_transport(backend).listen(addr)

    asyncio.run(run())


def test_ucx_rejects_malformed_addresses_and_devices():
    from expertmesh.transport.ucx import UcxTransport

    async def run():
        for bad in ["tcp://127.0.0.1:5555", "ucx://127.0.0.1", "ucx://:5555", "ucx://host:port"]:
            with pytest.raises(ValueError, match="ucx://HOST:PORT"):
                await UcxTransport().connect(bad)

    asyncio.run(run())
    with pytest.raises(ValueError, match="'mps'"):
        UcxTransport(device="mps")


@pytest.mark.parametrize("backend", UCX_MODES)
def test_ucx_on_uvloop(backend):
    """The nodes run uvloop: ucxx's progress and notifier threads must wake it as they wake asyncio's loop
    (polling: its progress task must share it with the others)."""
    import uvloop

    async def run():
        async with echo_link(backend, "uvloop") as conn:
            messages = [Combine(i, 0, 0, random_tensor(torch.bfloat16, (i * 300, 64), seed=i)) for i in range(6)]
            await asyncio.gather(*(conn.send(msg) for msg in messages))
            for msg in messages:
                assert same_bits((await conn.recv(timeout_s=10)).partial, msg.partial)

    uvloop.run(run())


@pytest.mark.parametrize("backend", UCX_MODES)
def test_ucx_close_wakes_waiting_receivers(backend):
    async def run():
        transport = make(backend)
        addr = address(backend, "close")
        listener = await transport.listen(addr)
        conn = await transport.connect(addr)
        waiting = [asyncio.create_task(conn.recv()), asyncio.create_task(listener.recv())]
        await asyncio.sleep(0)  # both wait before the closes
        await conn.close()
        await listener.close()
        for task, what in zip(waiting, ["connection", "listener"]):
            with pytest.raises(TransportError, match=f"{what} is closed"):
                await asyncio.wait_for(task, 5)
        with pytest.raises(TransportError, match="connection is closed"):
            await conn.recv(timeout_s=1)

    asyncio.run(run())


def test_ucx_without_ucxx_says_so(monkeypatch):
    from expertmesh.transport.ucx import UcxTransport
    monkeypatch.setitem(sys.modules, "ucxx", None)
    with pytest.raises(TransportError, match="pip install ucxx-cu13"):
        UcxTransport()


def test_ucx_polling_stops_its_progress_task_on_close():
    """Polling, the event loop's progress task spins a core: the last close must stop it, and a later transport
    on the same loop must progress again (ucxx keeps one progress task per loop)."""
    async def run():
        def progress_tasks() -> list[asyncio.Task]:
            return [task for task in asyncio.all_tasks()
                    if task.get_coro().__qualname__ == "PollingMode._progress_task"]

        for _ in range(2):
            async with echo_link("ucx-polling", "again") as conn:
                await conn.send(Combine(1, 0, 0, torch.ones(3)))
                assert (await conn.recv(timeout_s=10)).step == 1
                running = progress_tasks()
                assert len(running) == 1
            await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 5)
            assert running[0].cancelled() and progress_tasks() == []

    asyncio.run(run())


def test_ucx_progress_modes_cannot_share_an_event_loop():
    async def run():
        listener = await make("ucx").listen(address("ucx", "mixed"))
        try:
            with pytest.raises(TransportError, match="progress mode 'thread'.*'polling'"):
                await make("ucx-polling").listen(address("ucx", "mixed2"))
        finally:
            await listener.close()

    asyncio.run(run())
    with pytest.raises(ValueError, match="'spinning'"):
        make_transport("ucx", ucx_progress_mode="spinning")


EXIT_SCRIPT = """
import asyncio, sys
import torch
from expertmesh.transport.base import make_transport
from expertmesh.transport.protocol import Combine

async def main(mode, port):
    transport = make_transport("ucx", ucx_progress_mode=mode)
    listener = await transport.listen(f"ucx://127.0.0.1:{port}")
    conn = await transport.connect(f"ucx://127.0.0.1:{port}")
    await conn.send(Combine(1, 0, 0, torch.ones(3)))
    await listener.recv()  # then return with the listener and connection still open

asyncio.run(main(*sys.argv[1:]))
print("returned", flush=True)
"""


@pytest.mark.parametrize("mode", ["thread", "polling"])
def test_ucx_process_exits_with_transports_left_open(mode):
    """A process that never closed its ucx transports must still exit, in every progress mode."""
    import subprocess
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, mode, str(free_ucx_port())], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "returned" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_ucx_options_defaults_and_what_the_environment_overrides(monkeypatch):
    from expertmesh.transport.ucx_context import ucx_options
    monkeypatch.delenv("UCX_TLS", raising=False)
    monkeypatch.delenv("UCX_RNDV_THRESH", raising=False)
    monkeypatch.delenv("UCX_TCP_CM_REUSEADDR", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    reuse = {"TCP_CM_REUSEADDR": "y"}  # a restarted node listens on its port again at once
    assert ucx_options(cpu, None) == {"TLS": "tcp,sm,self", **reuse}  # the listener needs tcp
    assert ucx_options(cuda, None) == {"TLS": "tcp,cuda_copy,cuda_ipc,sm,self", "RNDV_THRESH": "8192", **reuse}
    assert ucx_options(cuda, "cuda_ipc,tcp,self")["TLS"] == "cuda_ipc,tcp,self"  # explicit wins
    monkeypatch.setenv("UCX_TLS", "tcp,self")
    monkeypatch.setenv("UCX_RNDV_THRESH", "inf")
    monkeypatch.setenv("UCX_TCP_CM_REUSEADDR", "n")
    assert ucx_options(cuda, None) == {}  # the operator's UCX_* variables are left to UCX


def test_packed_layout_starts_each_tensor_at_a_16_byte_offset():
    from expertmesh.transport.protocol import TensorMeta, packed_offsets, packed_views
    metas = [TensorMeta(torch.bfloat16, (3,)), TensorMeta(torch.int32, (2,)), TensorMeta(torch.float64, (0,)),
             TensorMeta(torch.float64, (1,))]
    assert packed_offsets(metas) == ([0, 16, 32, 32], 40)
    flat = torch.arange(40, dtype=torch.uint8)
    views = packed_views(flat, metas)
    assert [v.shape for v in views] == [(3,), (2,), (0,), (1,)]
    assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_and_separate_tensors_interleave_in_order(backend):
    """Tensors carved back to back from one buffer (as M2N's send buffers are) travel as one packed frame on
    ucx and arrive sharing one buffer; messages of separate tensors, inline ones and packed ones keep order."""
    from expertmesh.transport.protocol import TensorMeta, packed_views

    def dispatch(step, rows, packed):
        like = [random_tensor(torch.bfloat16, (rows, 512), seed=step), random_tensor(torch.int32, (rows, 2), seed=1),
                random_tensor(torch.float32, (rows, 2), seed=2)]
        if not packed:
            return Dispatch(step, 0, 0, *like)
        flat = torch.empty(rows * (1024 + 16), dtype=torch.uint8)
        views = packed_views(flat, [TensorMeta(t.dtype, tuple(t.shape)) for t in like])
        for view, tensor in zip(views, like):
            view.copy_(tensor)
        return Dispatch(step, 0, 0, *views)

    async def run():
        async with echo_link(backend, "packed") as conn:
            sent = [dispatch(1, 200, True), dispatch(2, 200, False), dispatch(3, 4, True), dispatch(4, 300, True),
                    dispatch(5, 4, False)]
            for message in sent:
                await conn.send(message)
            for message in sent:
                back = await conn.recv(timeout_s=10)
                assert back.step == message.step
                assert all(same_bits(a, b) for a, b in zip(back.tensors(), message.tensors()))
                storages = {t.untyped_storage().data_ptr() for t in back.tensors()}
                if backend.startswith("ucx") and message.step in (1, 4):  # packed and over the inline size
                    assert len(storages) == 1
                conn.recycle(back)

    asyncio.run(run())


def test_zmq_flushed_returns_once_earlier_sends_are_in_zmqs_hands():
    """Connection.flushed (what the lockstep M2N awaits for its step plan): the messages sent before it have left the
    socket thread's queue; on a closed connection it fails instead of waiting."""
    async def run():
        transport = make("zmq")
        addr = address("zmq", "flushed")
        listener = await transport.listen(addr)
        conn = await transport.connect(addr)
        handed = []
        socket = conn._io._socket
        original = socket.send_multipart
        socket.send_multipart = lambda frames, **kw: (handed.append(len(frames)), original(frames, **kw))[1]
        for step in range(3):
            await conn.send(Combine(step, 0, 0, torch.zeros(2, 4)))
        await conn.flushed()
        assert len(handed) == 3
        await conn.close()
        with pytest.raises(TransportError):
            await conn.flushed()
        await listener.close()

    asyncio.run(run())
