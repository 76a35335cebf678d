"""Which KV-cache blocks each sequence owns: a free list of block ids and, per sequence, its block table.

Pure host bookkeeping, as in vLLM and nano-vllm: block b holds tokens [b_index * block_size, ...) of the sequence
whose `block_ids` lists it. Each sequence's list is mirrored in a row of one numpy table (`tables`, row
`seq.block_row`), so that a step gathers its block table with one index: flattening every list each step took the
attention node's host 2-5 ms at 256 sequences of 3.5k tokens, half its step (RESULTS.md, eleventh session). Prefix
caching (sharing the blocks of a common prompt prefix between sequences, with
reference counts and content hashes) is left out: every block has exactly one owner."""
from __future__ import annotations

from collections import deque
from typing import Protocol

import numpy as np


class HoldsBlocks(Protocol):
    """What the block manager needs of a sequence (attention_node.scheduler.Sequence is one)."""
    block_ids: list[int]
    block_row: int  # its row of BlockManager.tables while it owns blocks; -1 otherwise

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
        # row r: the block_ids of the sequence whose block_row is r, then zeros; grown (doubled) on demand
        self.tables = np.zeros((16, 16), dtype=np.int32)
        self._free_rows = list(range(16))[::-1]

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
        if not self._free_rows:
            rows = len(self.tables)
            self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        seq.block_row = self._free_rows.pop()
        self._mirror(seq, 0)

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
        if needed:
            seq.block_ids.extend(self._free.popleft() for _ in range(needed))
            self._mirror(seq, len(seq.block_ids) - needed)

    def free(self, seq: HoldsBlocks) -> None:
        """Returns seq's blocks to the free list (the cache contents are left as they are: they are overwritten
        before anyone reads them, since a kernel reads only positions below a sequence's length)."""
        self._free.extend(seq.block_ids)
        if seq.block_row >= 0:
            self.tables[seq.block_row, :len(seq.block_ids)] = 0
            self._free_rows.append(seq.block_row)
        seq.block_ids, seq.block_row = [], -1

    def _mirror(self, seq: HoldsBlocks, start: int) -> None:
        """seq.block_ids[start:] into its row of the tables."""
        end = len(seq.block_ids)
        if end > self.tables.shape[1]:
            wider = np.zeros((len(self.tables), max(end, 2 * self.tables.shape[1])), dtype=np.int32)
            wider[:, :self.tables.shape[1]] = self.tables
            self.tables = wider
        self.tables[seq.block_row, start:end] = seq.block_ids[start:]
