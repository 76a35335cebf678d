"""Which KV-cache blocks each sequence owns: a free list of block ids and, per sequence, its block table.

Pure host bookkeeping, as in vLLM and nano-vllm: block b holds tokens [b_index * block_size, ...) of the sequence
whose `block_ids` lists it. Prefix caching (sharing the blocks of a common prompt prefix between sequences, with
reference counts and content hashes) is left out: every block has exactly one owner."""
from __future__ import annotations

from collections import deque
from typing import Protocol


class HoldsBlocks(Protocol):
    """What the block manager needs of a sequence (attention_node.scheduler.Sequence is one)."""
    block_ids: list[int]

    @property
    def num_tokens(self) -> int: ...


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} blocks of "
                             f"{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the blocks owned by sequences, 0..1."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int, reserve: int = 0) -> bool:
        """Whether a sequence of num_tokens tokens fits and leaves at least `reserve` blocks free."""
        return self.blocks_for(num_tokens) + reserve <= len(self._free)

    def allocate(self, seq: HoldsBlocks) -> None:
        """Blocks for every token of seq (those so far, including the ones it feeds this step); seq owns none."""
        if seq.block_ids:
            raise ValueError(f"sequence already owns blocks {seq.block_ids}; free them before allocating anew")
        needed = self.blocks_for(seq.num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"KV cache: {needed} blocks needed for {seq.num_tokens} tokens, "
                               f"{len(self._free)} free")
        seq.block_ids = [self._free.popleft() for _ in range(needed)]

    def blocks_to_append(self, seq: HoldsBlocks) -> int:
        """New blocks seq needs before a step that writes its tokens up to num_tokens: 1 when its newest token
        starts a block, else 0 (in general, however many its tokens outgrow what it owns)."""
        return max(0, self.blocks_for(seq.num_tokens) - len(seq.block_ids))

    def can_append(self, seq: HoldsBlocks) -> bool:
        return self.blocks_to_append(seq) <= len(self._free)

    def append(self, seq: HoldsBlocks) -> None:
        """Grows seq's block table to cover all of its tokens (a decode step crossing a block boundary)."""
        needed = self.blocks_to_append(seq)
        if needed > len(self._free):
            raise RuntimeError(f"KV cache: {needed} blocks needed to extend a sequence, {len(self._free)} free")
        seq.block_ids.extend(self._free.popleft() for _ in range(needed))

    def free(self, seq: HoldsBlocks) -> None:
        """Returns seq's blocks to the free list (the cache contents are left as they are: they are overwritten
        before anyone reads them, since a kernel reads only positions below a sequence's length)."""
        self._free.extend(seq.block_ids)
        seq.block_ids = []
