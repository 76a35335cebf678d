"""The ipc send kernel (m2n/ipc_copy.py) compiled on a GPU: bit-equal to its torch reference at decode and prefill
sizes, to this GPU's memory and, with two GPUs, to the other's over NVLink (peer access, as an opened IPC handle
gives it); replayed from a CUDA graph it counts one message per replay; and a receiver spinning on the flag on the
other GPU never sees the count before the words."""
import pytest
import torch

from expertmesh.m2n import ipc_copy
from expertmesh.m2n.cuda_driver import DevicePointer
from expertmesh.transport.protocol import TensorMeta, packed_offsets

pytestmark = pytest.mark.gpu
HIDDEN, TOP_K = 4096, 8
TARGETS = ["cuda:0", pytest.param("cuda:1", marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                     reason="needs 2 GPUs"))]


def message(tokens: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda:0").manual_seed(seed)
    return [torch.randn(tokens, HIDDEN, device="cuda:0", generator=g).to(torch.bfloat16),
            torch.randint(-1, 128, (tokens, TOP_K), device="cuda:0", generator=g, dtype=torch.int32),
            torch.rand(tokens, TOP_K, device="cuda:0", generator=g)]


def peer_access() -> None:
    """Kernels of each GPU may write the other's memory (torch enables peer access at a copy between them; an
    opened IPC handle enables it itself)."""
    for a, b in ((0, 1), (1, 0)):
        torch.zeros(1, device=f"cuda:{a}").copy_(torch.zeros(1, device=f"cuda:{b}"))
    torch.cuda.synchronize(0), torch.cuda.synchronize(1)


def layout(tensors):
    return packed_offsets([TensorMeta(t.dtype, tuple(t.shape)) for t in tensors])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("tokens", [1, 64, 3000])
def test_a_send_lands_bit_for_bit(target, tokens):
    if target != "cuda:0":
        assert torch.cuda.can_device_access_peer(0, 1)
        peer_access()
    tensors = message(tokens, tokens)
    offsets, nbytes = layout(tensors)
    slot = torch.zeros(nbytes, dtype=torch.uint8, device=target)
    flag = torch.zeros(1, dtype=torch.int64, device=target)
    arrived = torch.zeros(1, dtype=torch.int32, device="cuda:0")
    with torch.cuda.device(0):  # the kernel runs on the sender's GPU, writing the target's memory
        ipc_copy.send(DevicePointer(slot.data_ptr(), torch.int32), offsets, [ipc_copy.words_of(t) for t in tensors],
                      DevicePointer(flag.data_ptr(), torch.int64), arrived)
        torch.cuda.synchronize()
    expected = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:0")
    expected_flag = torch.zeros(1, dtype=torch.int64, device="cuda:0")
    ipc_copy.send_reference(expected, offsets, tensors, expected_flag)
    assert torch.equal(slot.cpu(), expected.cpu()) and flag.item() == 1 and arrived.item() == 0


def test_graph_replays_count_one_message_each():
    tensors = message(64, 1)
    offsets, nbytes = layout(tensors)
    slot = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:0")
    flag = torch.zeros(1, dtype=torch.int64, device="cuda:0")
    arrived = torch.zeros(1, dtype=torch.int32, device="cuda:0")
    words = [ipc_copy.words_of(t) for t in tensors]
    ipc_copy.send(slot.view(torch.int32), offsets, words, flag, arrived)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ipc_copy.send(slot.view(torch.int32), offsets, words, flag, arrived)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert flag.item() == 6 and arrived.item() == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_a_receiver_on_the_other_gpu_sees_the_words_once_it_sees_the_count():
    """GPU 1 spins on the flag (ipc.py's wait kernel), then copies the slot out: over 50 sends of fresh data, what it
    copied always equals what was sent."""
    from expertmesh.m2n.ipc import _wait
    peer_access()
    tokens = 64
    offsets, nbytes = layout(message(tokens, 0))
    slot = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:1")
    flag = torch.zeros(1, dtype=torch.int64, device="cuda:1")
    taken = torch.zeros(1, dtype=torch.int64, device="cuda:1")
    arrived = torch.zeros(1, dtype=torch.int32, device="cuda:0")
    sent, seen = [], []
    receiver = torch.cuda.Stream("cuda:1")
    for i in range(50):
        with torch.cuda.device(1), torch.cuda.stream(receiver):
            _wait[(1,)](flag, taken, num_warps=1)
            seen.append(slot.clone())
        tensors = message(tokens, 100 + i)
        with torch.cuda.device(0):
            ipc_copy.send(DevicePointer(slot.data_ptr(), torch.int32), offsets,
                          [ipc_copy.words_of(t) for t in tensors], DevicePointer(flag.data_ptr(), torch.int64),
                          arrived)
        expected = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:0")
        ipc_copy.send_reference(expected, offsets, tensors, torch.zeros(1, dtype=torch.int64, device="cuda:0"))
        sent.append(expected)
        receiver.synchronize()  # the next send must not overwrite the slot before this copy-out
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(seen, sent))


def test_one_compiled_variant_serves_every_slot_and_size():
    """Flags and counts 8 bytes apart per microbatch, sources at any 4-byte offset, any size: no second variant
    of the send, signal or wait kernels (one loaded mid-serving beside a pending wait would stall until the device
    drains)."""
    from expertmesh.m2n.ipc import _signal, _wait
    flags = torch.zeros(4, dtype=torch.int64, device="cuda:0")
    taken = torch.zeros(4, dtype=torch.int64, device="cuda:0")
    arrived = torch.zeros(4, dtype=torch.int32, device="cuda:0")
    slot = torch.zeros(1 << 20, dtype=torch.int32, device="cuda:0")
    pool = torch.zeros(1 << 18, dtype=torch.int32, device="cuda:0")
    for mb, (tokens, shift) in enumerate([(1, 0), (3, 1), (17, 2), (64, 3)]):
        words = [pool[shift:shift + tokens * 2048], pool[shift + 1:shift + 1 + tokens * 8]]
        ipc_copy.send(slot, [0, tokens * 8192], words, flags[mb:mb + 1], arrived[mb:mb + 1])
        _signal[(1,)](flags[mb:mb + 1], num_warps=1)
        _wait[(1,)](flags[mb:mb + 1], taken[mb:mb + 1], num_warps=1)  # 2 signalled, 1 taken: passes at once
    torch.cuda.synchronize()
    assert flags.tolist() == [2] * 4 and taken.tolist() == [1] * 4
    variants = lambda kernel: len(kernel.device_caches[torch.cuda.current_device()][0])  # noqa: E731
    assert variants(ipc_copy._send_kernel) == variants(_signal) == variants(_wait) == 1
