"""An ipc send as one kernel: a message's tensors copied by the SMs into the peer's slot, and the slot's flag counted
up once every copy has landed (ipc.py's `_signal`, folded in). The driver's copies (ipc.py's default) cost a call
and a copy-engine launch per tensor, three a round, each microseconds on the host and on the device; DeepEP's
low-latency kernels send from the SMs for the same reason. `send_reference` is the same thing in torch.

The copy is in 4-byte words: a packed message's tensors start at 16-byte offsets (protocol.packed_offsets) and
every tensor a round carries has an even count of 2-byte values or 4-byte ones; `words_of` refuses the others."""
from __future__ import annotations

from typing import Sequence

import torch

from ..ops.backend import tl, triton

BLOCK = 1024  # words a program copies per step of its loop
WORDS_PER_PROGRAM = 16384  # 64 KB: a decode round (8 KB a token at hidden 4096) spreads over several SMs
MAX_PROGRAMS = 64


def words_of(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor's bytes as int32 words (a view where it is contiguous), or None if its size is no multiple of 4."""
    if tensor.nbytes % 4:
        return None
    return tensor.contiguous().reshape(-1).view(torch.uint8).view(torch.int32)


def send_reference(slot: torch.Tensor, offsets: Sequence[int], tensors: Sequence[torch.Tensor],
                   flag: torch.Tensor) -> None:
    """slot (uint8) gets each tensor's bytes at its byte offset, then flag (int64, one element) counts one more."""
    for offset, tensor in zip(offsets, tensors):
        slot[offset:offset + tensor.nbytes].copy_(tensor.contiguous().reshape(-1).view(torch.uint8))
    flag += 1


# Sizes and offsets change from round to round, and a source's alignment with them (a node's slice of the masked
# ids), nor the alignment of a microbatch's flag and counter: none is specialized, so one compiled variant serves
# every round (a variant first loaded beside a pending wait kernel would wait for the device to drain:
# m2n/link_plan.py). The destination is a slot's start.
@triton.jit(do_not_specialize=["words0", "words1", "words2", "at1", "at2"],
            do_not_specialize_on_alignment=["src0", "src1", "src2", "flag", "arrived"])
def _send_kernel(dst, src0, src1, src2, words0, words1, words2, at1, at2, flag, arrived, BLOCK: tl.constexpr):
    """Copies src0, src1, src2 (int32 words) to dst at offsets 0, at1, at2 (in 16-byte units, so that the stores
    are 16-byte vectors), each program a strided share; the last program to finish counts the message on flag. Its
    release at system scope follows the other programs' (acquired through `arrived`), so a receiver on another GPU
    that sees the count sees every word."""
    at1 = at1 * 4
    at2 = at2 * 4
    programs = tl.num_programs(0)
    stride = programs * BLOCK
    lanes = tl.arange(0, BLOCK)
    for start in range(tl.program_id(0) * BLOCK, words0, stride):
        i = start + lanes
        tl.store(dst + i, tl.load(src0 + i, mask=i < words0), mask=i < words0)
    for start in range(tl.program_id(0) * BLOCK, words1, stride):
        i = start + lanes
        tl.store(dst + at1 + i, tl.load(src1 + i, mask=i < words1), mask=i < words1)
    for start in range(tl.program_id(0) * BLOCK, words2, stride):
        i = start + lanes
        tl.store(dst + at2 + i, tl.load(src2 + i, mask=i < words2), mask=i < words2)
    tl.debug_barrier()  # every thread's stores before this program's arrival
    if tl.atomic_add(arrived, 1, sem="acq_rel", scope="sys") == programs - 1:
        tl.atomic_xchg(arrived, 0, sem="relaxed", scope="gpu")  # zero for the next send (and graph replay)
        tl.atomic_add(flag, 1, sem="release", scope="sys")


def send(dst, offsets: Sequence[int], words: Sequence[torch.Tensor], flag, arrived: torch.Tensor) -> None:
    """The kernel on the current stream: words (int32, from words_of; up to three) to dst (an int32 pointer: a
    tensor or cuda_driver.DevicePointer) at byte offsets (multiples of 16), then flag (int64 pointer) += 1.
    arrived: an int32 counter of this (peer, slot), zero between sends."""
    if len(words) > 3 or len(words) != len(offsets):
        raise ValueError(f"the send kernel copies up to three tensors, each with an offset, not {len(words)}")
    if any(offset % 16 for offset in offsets) or (offsets and offsets[0] != 0):
        raise ValueError(f"16-byte offsets from 0 are needed (protocol.packed_offsets), not {list(offsets)}")
    padded = list(words) + [words[0]] * (3 - len(words))  # absent tensors: 0 words of any valid pointer
    counts = [w.numel() for w in words] + [0] * (3 - len(words))
    at = [o // 16 for o in offsets] + [0] * (3 - len(offsets))
    programs = max(1, min(MAX_PROGRAMS, -(-sum(counts) // WORDS_PER_PROGRAM)))
    _send_kernel[(programs,)](dst, *padded, *counts, at[1], at[2], flag, arrived, BLOCK=BLOCK, num_warps=4)
