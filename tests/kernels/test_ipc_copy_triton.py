"""The ipc send kernel (m2n/ipc_copy.py) in Triton's interpreter against its torch reference: a round's message (a
bf16 hidden state, int32 expert ids, float32 weights, packed at 16-byte offsets) lands bit for bit, the flag counts
exactly one message per send, the arrival counter is zero again after each, and a send spread over several
programs is signalled once, by the last."""
import pytest
import torch

pytest.importorskip("triton")

from expertmesh.m2n import ipc_copy
from expertmesh.transport.protocol import TensorMeta, packed_offsets


def round_message(tokens: int, hidden: int = 64, top_k: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, hidden, generator=g).to(torch.bfloat16),
            torch.randint(-1, 8, (tokens, top_k), generator=g, dtype=torch.int32),
            torch.rand(tokens, top_k, generator=g)]


@pytest.mark.parametrize("tokens,words_per_program", [(1, 16384), (5, 16384), (37, 256), (0, 16384)])
def test_sends_land_bit_for_bit_and_count_once(monkeypatch, tokens, words_per_program):
    monkeypatch.setattr(ipc_copy, "WORDS_PER_PROGRAM", words_per_program)  # 37 tokens: 5 programs
    tensors = round_message(tokens)
    offsets, nbytes = packed_offsets([TensorMeta(t.dtype, tuple(t.shape)) for t in tensors])
    slot, expected = torch.full((nbytes + 64,), 0xAB, dtype=torch.uint8), torch.full((nbytes + 64,), 0xAB,
                                                                                      dtype=torch.uint8)
    flag, expected_flag = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    arrived = torch.zeros(1, dtype=torch.int32)
    for send in range(1, 3):  # the second send reuses the counter the first left at zero
        ipc_copy.send(slot.view(torch.int32), offsets, [ipc_copy.words_of(t) for t in tensors], flag, arrived)
        ipc_copy.send_reference(expected, offsets, tensors, expected_flag)
        assert torch.equal(slot, expected)  # padding between the tensors and past the end untouched
        assert flag.item() == expected_flag.item() == send and arrived.item() == 0


def test_what_the_kernel_cannot_send_is_named():
    assert ipc_copy.words_of(torch.zeros(3, dtype=torch.bfloat16)) is None  # 6 bytes: not whole words
    words = [ipc_copy.words_of(t) for t in round_message(2)]
    flag, arrived = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int32)
    slot = torch.zeros(4096, dtype=torch.int32)
    with pytest.raises(ValueError, match="16-byte offsets"):
        ipc_copy.send(slot, [0, 260, 272], words, flag, arrived)
    with pytest.raises(ValueError, match="up to three"):
        ipc_copy.send(slot, [0, 256, 272, 288], words + words[:1], flag, arrived)
