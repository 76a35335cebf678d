"""The lockstep M2N over gloo and over UCX links between real processes: one attention side (LockstepClient) and
two expert nodes (ExpertNode with LockstepRounds), two microbatches of different sizes over three MoE layers, one of
which an expert node holds nothing of; and over both at once (transport.backend=lockstep with expert node 1 on
another host: gloo to expert node 0, UCX to expert node 1, m2n/mixed.py). The partial sums must add up to every
expert computed in one place; an expert node that dies mid-step must fail the attention side's round with a
TransportError, not hang it."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
import traceback

import pytest
import torch

from expertmesh.launcher.local import free_port
from expertmesh.m2n.dist import DistLinks
from expertmesh.m2n.links import slot_bytes_for
from expertmesh.m2n.lockstep import LockstepClient, RoundCapacityError
from expertmesh.ops.fused_moe import fused_moe_reference, stack_experts
from expertmesh.placement.plan import Placement
from tests.fused_moe_cases import random_experts, random_routing

NUM_EXPERTS, HIDDEN, INTER, TOP_K = 8, 32, 48, 2
LAYERS = [1, 3, 4]
# expert node 0 holds experts 0-3 of layers 1 and 3 and every expert of layer 4; node 1 the rest
NODES_OF = {1: [[e // 4] for e in range(8)], 3: [[e // 4] for e in range(8)], 4: [[0]] * 8}
TOKENS = [5, 3]  # per microbatch
SLOT_BYTES = slot_bytes_for(16, HIDDEN, torch.float32, TOP_K)
BACKENDS = ["gloo", "ucx-lockstep", "mixed"]


def _links(backend: str, dist_address: str, rank: int, recv_timeout_s: float):
    """Rank `rank`'s links (0: the attention node; 1, 2: the expert nodes); made inside the process's event loop."""
    if backend == "mixed":
        from expertmesh.config import Config
        from expertmesh.m2n.link_plan import plan_links
        from expertmesh.m2n.mixed import make_mixed_links
        config = Config()
        config.transport.backend, config.transport.recv_timeout_s = "lockstep", recv_timeout_s
        config.engine.microbatches, config.cluster.dist_address = 2, dist_address
        config.cluster.attention_hosts, config.cluster.expert_hosts = ["h0"], ["h0", "h1"]
        plan = plan_links(config)
        links = make_mixed_links(config, plan, rank, [1, 2] if rank == 0 else [0], "cpu", SLOT_BYTES)
        links.plan = plan  # as make_links sets it: the handshake checks both ends chose alike
        return links
    if backend == "gloo":
        from expertmesh.m2n.dist import init_links
        return init_links("gloo", dist_address, 1, 2, rank, 2, "cpu", 30.0, recv_timeout_s, SLOT_BYTES)
    from expertmesh.m2n.ucx_links import UcxLinks  # its worker address crosses in the Hello
    return UcxLinks(1, rank, [1, 2] if rank == 0 else [0], 2, SLOT_BYTES, "cpu", recv_timeout_s)


def _experts_of(node: int | None) -> dict:
    """The experts of every layer that `node` holds (None: all of them), the same weights wherever held."""
    stacks = {}
    for layer in LAYERS:
        raw = random_experts(NUM_EXPERTS, range(NUM_EXPERTS), HIDDEN, INTER, torch.float32, seed=layer)[0]
        held = [e for e, nodes in enumerate(NODES_OF[layer]) if node is None or node in nodes]
        if held:
            stacks[layer] = stack_experts({e: raw[e] for e in held}, NUM_EXPERTS)
    return stacks


def _inputs(layer: int, microbatch: int):
    ids, weights = random_routing(TOKENS[microbatch], NUM_EXPERTS, TOP_K, seed=10 * layer + microbatch)
    hidden = torch.randn(TOKENS[microbatch], HIDDEN, generator=torch.Generator().manual_seed(layer + microbatch))
    return hidden, ids, weights


def _expert_main(backend: str, node: int, dist_address: str, address: str, die_after_plan: bool) -> None:
    from expertmesh.expert_node.lockstep import LockstepRounds
    from expertmesh.expert_node.node import ExpertNode
    from expertmesh.transport.zmq import ZmqTransport

    async def main():
        listener = await ZmqTransport().listen(address)
        links = _links(backend, dist_address, 1 + node, 30.0)
        expert_node = ExpertNode(node, _experts_of(node), NUM_EXPERTS, listener)
        expert_node.rounds = LockstepRounds(links, LAYERS, 16, HIDDEN, TOP_K, torch.float32, "cpu",
                                            expert_node.compute_lane, 30.0)
        if die_after_plan:  # the first plan arrives, then the process is gone mid-step
            original = expert_node.rounds.add
            expert_node.rounds.add = lambda plan: (original(plan), os._exit(3))
        await expert_node.serve()

    asyncio.run(main())


def _attention_main(backend: str, dist_address: str, addresses: list[str], recv_timeout_s: float, results) -> None:
    from expertmesh.transport.base import connect_within
    from expertmesh.transport.zmq import ZmqTransport

    async def main():
        links = _links(backend, dist_address, 0, recv_timeout_s)
        conns = [await connect_within(ZmqTransport(), a, 30.0) for a in addresses]
        client = LockstepClient(conns, links, Placement(2, NODES_OF), 0, 16, HIDDEN, torch.float32, 2, "cpu",
                                recv_timeout_s)
        await client.handshake(6, NUM_EXPERTS, 30.0)
        outputs = {}
        started = time.monotonic()
        try:
            for step, tokens in enumerate(([5, 3], [5], [5, 3], [5], [5], [5, 3])):
                await client.begin_step(step, tokens)
                async def microbatch(mb):
                    for layer in LAYERS:
                        handle = await client.dispatch(step, layer, mb, *_inputs(layer, mb))
                        answers = await client.gather(handle)
                        outputs[(step, layer, mb)] = client.reduce(handle, answers, answers[0]).numpy().copy()
                await asyncio.gather(*(microbatch(mb) for mb in range(len(tokens))))
                await client.end_step(step)
            results.put(("ok", outputs, client.link_backends, links.backend))  # numpy, not a shared tensor
        except Exception as exc:
            results.put(("error", type(exc).__name__, str(exc), time.monotonic() - started))

    try:
        asyncio.run(main())
    except Exception:
        results.put(("crash", traceback.format_exc()))


def _run(backend: str, die_after_plan: bool, recv_timeout_s: float = 20.0):
    # forked from a server that imported torch and the nodes' modules once: a spawned child imports them anew,
    # seconds on a 2-core host (no UCX state there: ucx_links imports ucxx when links are made)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "expertmesh.expert_node.node", "expertmesh.m2n.lockstep",
                                "tests.fused_moe_cases"])
    dist_address = f"tcp://127.0.0.1:{free_port()}"
    addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    results = ctx.Queue()
    experts = [ctx.Process(target=_expert_main, daemon=True,
                           args=(backend, n, dist_address, addresses[n], die_after_plan and n == 1)) for n in range(2)]
    attention = ctx.Process(target=_attention_main, args=(backend, dist_address, addresses, recv_timeout_s, results),
                            daemon=True)
    for process in experts + [attention]:
        process.start()
    try:
        return results.get(timeout=120)
    finally:
        for process in experts + [attention]:
            process.kill()
            process.join(5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounds_add_up_to_all_experts_in_one_place(backend):
    result = _run(backend, die_after_plan=False)
    assert result[0] == "ok", result
    full = _experts_of(None)
    for (step, layer, mb), got in result[1].items():
        expected = fused_moe_reference(*_inputs(layer, mb), full[layer])
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)
    assert len(result[1]) == 9 * len(LAYERS)
    if backend == "mixed":  # each link over its own backend; the step's rounds as over one
        assert result[2] == ["gloo", "ucx-lockstep"] and result[3] == "gloo+ucx"


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_node_dying_mid_step_fails_the_round_not_hangs(backend):
    result = _run(backend, die_after_plan=True, recv_timeout_s=10.0)
    assert result[0] == "error", result
    assert result[1] == "TransportError", result
    assert result[3] < 15.0


def test_a_microbatch_over_capacity_is_refused_before_anything_is_sent():
    links = DistLinks("gloo", 1, 0, {}, 2, SLOT_BYTES, "cpu", 1.0)
    client = LockstepClient([], links, Placement(0, {}), 0, 16, HIDDEN, torch.float32, 2, "cpu", 1.0)
    with pytest.raises(RoundCapacityError, match="17 tokens"):
        asyncio.run(client.begin_step(1, [17, 2]))
    with pytest.raises(RoundCapacityError, match="3 microbatches"):
        asyncio.run(client.begin_step(1, [1, 1, 1]))


def test_a_handshake_the_links_refuse_fails_at_once_with_the_reason():
    """An expert node whose links cannot take an attention node's handshake (ipc: a bad region handle) answers it
    with the reason, instead of leaving it waiting out the connect timeout."""
    from expertmesh.expert_node.lockstep import LockstepRounds
    from expertmesh.expert_node.node import ExpertNode
    from expertmesh.transport.inproc import InprocTransport
    from expertmesh.m2n.handshake import ExpertNodeError, greet_expert_nodes

    class RefusingLinks(DistLinks):
        def attach(self, peer, handle):
            raise ValueError(f"rank {peer} sent a handle of {len(handle)} bytes")

    async def run():
        transport = InprocTransport()
        listener = await transport.listen("inproc://refusing")
        links = RefusingLinks("gloo", 1, 1, {}, 2, SLOT_BYTES, "cpu", 1.0)
        node = ExpertNode(0, _experts_of(0), NUM_EXPERTS, listener)
        node.rounds = LockstepRounds(links, LAYERS, 16, HIDDEN, TOP_K, torch.float32, "cpu", node.compute_lane, 1.0)
        serving = asyncio.create_task(node.serve())
        try:
            conn = await transport.connect("inproc://refusing")
            started = time.monotonic()
            with pytest.raises(ExpertNodeError, match="refused the handshake.*sent a handle of 0 bytes"):
                await greet_expert_nodes([conn], Placement(2, NODES_OF), 0, 6, NUM_EXPERTS, 30.0, links)
            assert time.monotonic() - started < 5.0
        finally:
            serving.cancel()

    asyncio.run(run())


class _RecordingLinks:
    """Links that deliver zeros at once and record the order of the expert side's calls."""
    backend, attention_nodes, microbatches, device_ordered = "recording", 1, 2, False

    def __init__(self, receives_hold_device: bool) -> None:
        self.receives_hold_device = receives_hold_device
        self.calls: list[tuple[str, int]] = []

    def attention_rank(self, node: int) -> int:
        return node

    def receive(self, microbatch, peer, metas):
        self.calls.append(("receive", microbatch))
        return [torch.zeros(m.shape, dtype=m.dtype) for m in metas], []

    def send(self, microbatch, peer, tensors):
        self.calls.append(("send", microbatch))
        return []

    def flush(self) -> None:
        pass

    async def wait(self, works) -> None:
        pass


@pytest.mark.parametrize("hold", [False, True])
def test_receives_are_posted_ahead_only_where_they_do_not_hold_the_device(hold):
    """On NCCL a posted receive is a kernel waiting for its message: one posted ahead of a compute would make that
    compute's first-use kernel load wait for the peer, which waits for the compute (a deadlock on 2 x H200)."""
    from expertmesh.expert_node.lockstep import LockstepRounds
    from expertmesh.transport.protocol import StepPlan
    links = _RecordingLinks(hold)

    def compute(lane, layer, hidden, ids, weights):
        links.calls.append(("compute", layer))
        return torch.zeros_like(hidden)

    rounds = LockstepRounds(links, [1, 3], 16, HIDDEN, TOP_K, torch.float32, "cpu", compute, 1.0)

    async def on_error(*args):
        raise AssertionError(args)

    asyncio.run(rounds.run(0, StepPlan(0, 0, [2, 3]), on_error))
    kinds = [kind for kind, _ in links.calls]
    assert kinds.count("compute") == kinds.count("send") == kinds.count("receive") == 4
    # a receive between the first receive and the first compute is the next round's, posted ahead
    ahead = kinds[1] == "receive"
    assert ahead != hold
    if hold:
        assert kinds == ["receive", "compute", "send"] * 4


def test_a_post_that_fails_on_a_closed_connection_is_a_transport_error(monkeypatch):
    """gloo may fail batch_isend_irecv itself, not only the wait, once a peer has closed (seen in CI)."""
    import torch.distributed as dist

    from expertmesh.transport.base import TransportError

    def closed(ops):
        raise RuntimeError("[gloo/transport/tcp/pair.cc] Connection closed by peer")

    monkeypatch.setattr(dist, "batch_isend_irecv", closed)
    monkeypatch.setattr(dist, "P2POp", lambda *op: op)  # no process group here
    links = DistLinks("gloo", 1, 0, {(0, 0): object()}, 1, SLOT_BYTES, "cpu", 1.0)
    links.send(0, 1, [torch.zeros(2, HIDDEN)])
    with pytest.raises(TransportError, match="gloo link failed: .*Connection closed"):
        links.flush()
    links.flush()  # the failed batch is gone: nothing is posted twice


class _Communicator:
    """A process group whose abort returns once `until` is set (an abort's device-wide sync, waiting for kernels
    pending on the other communicators), and sets `aborted`."""

    def __init__(self, until) -> None:
        import threading
        self.until, self.aborted = until, threading.Event()

    def abort(self) -> None:
        self.aborted.set()
        self.until.wait(30)


def _nccl_world(monkeypatch, groups):
    import torch.distributed as dist

    from expertmesh.m2n import dist as dist_links
    bookkeeping = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(dist_links, "_process_groups", lambda: groups)
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda: bookkeeping.append(1))
    monkeypatch.setattr(dist_links, "_abandoned", False)
    return dist_links, bookkeeping


def test_every_nccl_communicator_is_aborted_at_once(monkeypatch):
    """Two microbatch groups, each with a receive from a dead peer pending: one's abort returns only once the
    other's has begun (2 x H200: aborted one after the other, the first never returned). close_links must start
    them together, then clear torch's bookkeeping."""
    import threading
    second = _Communicator(threading.Event())
    first = _Communicator(second.aborted)
    second.until = first.aborted
    dist_links, bookkeeping = _nccl_world(monkeypatch, [first, second])
    started = time.monotonic()
    dist_links.close_links(timeout_s=10)
    assert time.monotonic() - started < 5 and bookkeeping == [1] and not dist_links._abandoned


def test_an_nccl_abort_that_blocks_is_abandoned_not_waited_for(monkeypatch, caplog):
    """An abort that never returns: close_links (and so release) must return within its bound, once, and leave
    the world alone afterwards."""
    import threading
    blocked = threading.Event()
    stuck = _Communicator(blocked)
    dist_links, bookkeeping = _nccl_world(monkeypatch, [stuck])
    started = time.monotonic()
    try:
        dist_links.close_links(timeout_s=0.2)
        assert time.monotonic() - started < 5 and stuck.aborted.is_set() and bookkeeping == []
        assert "did not return within" in caplog.text
        stuck.aborted.clear()
        dist_links.close_links(timeout_s=0.2)  # abandoned: not aborted a second time
        assert not stuck.aborted.is_set()
    finally:
        blocked.set()


def test_a_rounds_sends_and_receives_go_in_separate_batches(monkeypatch):
    """The expert node posts its receive and its answer's send apart, so the attention node must too: NCCL leaves a
    group of a send and a receive, met by the peer as two groups, undefined (it hung on 2 x H200). A round is one
    batch of sends to every expert node, then one batch of receives, each message one operation."""
    import torch.distributed as dist
    batches = []
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: batches.append(ops) or [])
    monkeypatch.setattr(dist, "P2POp", lambda op, tensor, peer, group: (op.__name__, peer, tensor.numel()))
    links = DistLinks("nccl", 1, 0, {(0, 0): object()}, 1, SLOT_BYTES, "cpu", 1.0)
    client = LockstepClient([None, None], links, Placement(2, NODES_OF), 0, 16, HIDDEN, torch.float32, 1, "cpu", 1.0)
    ids, weights = random_routing(5, NUM_EXPERTS, TOP_K, 4, "cpu", seed=0)
    client.enqueue_round(1, 0, torch.randn(5, HIDDEN), ids, weights)
    message = slot_bytes_for(5, HIDDEN, torch.float32, TOP_K)
    assert batches == [[("isend", 1, message), ("isend", 2, message)],
                       [("irecv", 1, 5 * HIDDEN * 4), ("irecv", 2, 5 * HIDDEN * 4)]]


class _DeviceOrderedLinks(_RecordingLinks):
    """The attention side's links as ipc and NCCL are: sends, receives and waits only enqueued, in the order the
    device will run them, which is recorded."""
    device_ordered = True

    def __init__(self) -> None:
        super().__init__(receives_hold_device=True)
        self.rounds = {0: 0, 1: 0}  # microbatch -> rounds it has sent

    def expert_rank(self, node: int) -> int:
        return 1 + node

    def send(self, microbatch, peer, tensors):
        self.calls.append(("send", (self.rounds[microbatch], microbatch)))  # (MoE layer index, microbatch)
        self.rounds[microbatch] += 1
        return [(self.rounds[microbatch] - 1, microbatch)]

    def receive(self, microbatch, peer, metas):
        return [torch.zeros(m.shape, dtype=m.dtype) for m in metas], []

    def enqueue_wait(self, works) -> None:
        self.calls += [("wait", work) for work in works]

    async def wait(self, works) -> None:
        self.enqueue_wait(works)


class _SlowFlushConnection:
    """A control connection whose hand-off of a message to its socket takes a few turns of the event loop."""

    async def send(self, message) -> None:
        pass

    async def flushed(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)


def test_rounds_are_enqueued_in_the_expert_nodes_order(mixtral_dir):
    """On device-ordered links a wait for a round's answer holds the stream until the expert node answers it, and
    the expert node answers rounds in (layer, microbatch) order: every round's send must be enqueued before any
    wait for a round at or after it. The plan's hand-off must not let the second microbatch overtake the first
    (it did when the first dispatch awaited it: a deadlock on 2 x H200)."""
    from expertmesh.attention_node.model_runner import ModelRunner
    from expertmesh.attention_node.scheduler import Scheduler, Sequence
    from expertmesh.kv.block_manager import BlockManager
    from expertmesh.kv.cache import PagedKVCache
    from expertmesh.model.spec import ModelSpec
    from expertmesh.model.weights import load_attention_side
    from expertmesh.transport.protocol import SamplingParams
    spec = ModelSpec.from_dir(mixtral_dir)
    links = _DeviceOrderedLinks()
    client = LockstepClient([_SlowFlushConnection()], links, Placement.contiguous(spec, 1), 0, 64,
                            spec.hidden_size, torch.float32, 2, "cpu", 1.0)
    kv = PagedKVCache(spec, 16, 16, torch.float32, "cpu")
    runner = ModelRunner(spec, load_attention_side(str(mixtral_dir), spec, torch.float32, "cpu"), kv, client,
                         "cpu", context_len=64)
    scheduler = Scheduler(BlockManager(16, 16), 4, 256, 64, spec.eos_token_ids)
    for i, prompt in enumerate([[1, 2, 3, 4, 5], [6, 7]]):
        scheduler.add(Sequence(f"s{i}", prompt, SamplingParams(max_tokens=1), 0))
    asyncio.run(runner.forward(1, scheduler.schedule(), 2))
    sent = [work for kind, work in links.calls if kind == "send"]
    assert sent == sorted(sent) and len(sent) == 2 * len(spec.moe_layer_ids)
    for i, (kind, work) in enumerate(links.calls):
        if kind == "wait":
            assert all(later > work for k, later in links.calls[i:] if k == "send"), links.calls
