"""Per-step tables for paged attention: where each sequence's cached tokens live and where each new token goes.

Built once per step on the host (numpy), copied to the device in one copy without a host wait, and shared
by every layer; padded on request to fixed sizes so a CUDA graph captured for that size can replay them."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ..host_copy import to_device_all


@dataclass
class StepMetadata:
    """A step's tokens are the concatenation of each sequence's new tokens (sequence i's are
    query_start[i]:query_start[i + 1]); each attends to its sequence's first seq_lens[i] tokens, the new ones
    included, whose K/V sit at block_table[i][p // block_size], offset p % block_size."""
    block_table: torch.Tensor  # [S, width] int32: the blocks of each sequence in order; padded with block 0
    slot_mapping: torch.Tensor  # [T] int64: block * block_size + offset where each new token's K/V is written; -1: skip
    seq_lens: torch.Tensor  # [S] int32: tokens of each sequence in the cache after this step (cached + new)
    query_start: torch.Tensor  # [S + 1] int32: prefix sums of the new-token counts
    positions: torch.Tensor  # [T] int64: position of each new token in its sequence (rotary)
    max_query_len: int  # most new tokens of one sequence (1: a pure decode step)
    max_seq_len: int  # longest seq_len
    num_seqs: int  # real sequences (the first num_seqs rows; the rest is padding)
    num_tokens: int  # real tokens (the first num_tokens entries; the rest is padding)


def build_step_metadata(seqs: list[tuple[list[int], int, int]], block_size: int, device: torch.device | str,
                        pad_to: tuple[int, int] | None = None, block_table_width: int | None = None,
                        mirror: tuple[np.ndarray, list[int]] | None = None) -> StepMetadata:
    """step_tables on the device, in one copy."""
    tables, *sizes = step_tables(seqs, block_size, pad_to, block_table_width, mirror)
    return StepMetadata(*to_device_all(tables, device), *sizes)


def step_tables(seqs: list[tuple[list[int], int, int]], block_size: int, pad_to: tuple[int, int] | None = None,
                block_table_width: int | None = None, mirror: tuple[np.ndarray, list[int]] | None = None
                ) -> tuple[list[np.ndarray], int, int, int, int]:
    """The host tables of a step's metadata (numpy, StepMetadata's order) and its sizes (max_query_len,
    max_seq_len, num_seqs, num_tokens), over `seqs`, each given as (block_ids, num_cached, num_new): the blocks the
    sequence owns (covering at least num_cached + num_new tokens), the tokens already in the cache, and the
    tokens it feeds this step (positions num_cached .. num_cached + num_new - 1).

    pad_to=(num_seqs, num_tokens) pads to a CUDA-graph bucket: padding sequences have seq_len 0 and no new
    tokens (query_start repeats the last real end), padding tokens have slot -1 (not stored) and position 0.
    block_table_width fixes the table's width (a graph needs one, e.g. blocks for the full context); default:
    the most blocks of any sequence, at least 1. mirror=(tables, rows): row rows[i] of `tables` starts with sequence
    i's block_ids (BlockManager.tables), so that the table is one gather rather than a walk of every list."""
    num_seqs = len(seqs)
    num_cached = np.fromiter((c for _, c, _ in seqs), np.int64, num_seqs)
    num_new = np.fromiter((n for _, _, n in seqs), np.int64, num_seqs)
    num_blocks = np.fromiter((len(b) for b, _, _ in seqs), np.int64, num_seqs)
    seq_lens = num_cached + num_new
    num_tokens = int(num_new.sum())
    padded_seqs, padded_tokens = pad_to if pad_to is not None else (num_seqs, num_tokens)
    if padded_seqs < num_seqs or padded_tokens < num_tokens:
        raise ValueError(f"pad_to={pad_to} is smaller than the step's {num_seqs} sequences and {num_tokens} tokens")
    longest_table = int(num_blocks.max(initial=0))
    width = max(1, longest_table) if block_table_width is None else block_table_width
    if width < longest_table:
        raise ValueError(f"block_table_width={width} is narrower than a sequence's {longest_table} blocks")
    short = np.flatnonzero(num_blocks * block_size < seq_lens)
    if short.size:
        i = int(short[0])
        raise ValueError(f"sequence {i}: {num_blocks[i]} blocks of {block_size} cannot hold its {seq_lens[i]} "
                         f"tokens ({num_cached[i]} cached + {num_new[i]} new)")

    block_table = np.zeros((padded_seqs, width), dtype=np.int32)
    if mirror is not None:  # the sequences' rows, gathered (past a sequence's blocks the tables hold zeros)
        tables, rows = mirror
        columns = min(width, tables.shape[1])
        block_table[:num_seqs, :columns] = tables[np.asarray(rows, dtype=np.intp), :columns]
    else:  # vectorised over tokens and blocks: the block ids flattened once, scattered into their rows
        flat_blocks = np.fromiter(itertools.chain.from_iterable(b for b, _, _ in seqs), np.int32,
                                  int(num_blocks.sum()))
        block_row = np.repeat(np.arange(num_seqs), num_blocks)
        block_table[block_row, np.arange(flat_blocks.size) - np.repeat(np.cumsum(num_blocks) - num_blocks,
                                                                       num_blocks)] = flat_blocks
    query_start = np.full(padded_seqs + 1, num_tokens, dtype=np.int32)
    query_start[0] = 0
    np.cumsum(num_new, out=query_start[1:num_seqs + 1])
    token_seq = np.repeat(np.arange(num_seqs), num_new)  # the sequence of each real token
    new_positions = num_cached[token_seq] + np.arange(num_tokens) - query_start[token_seq]
    positions = np.zeros(padded_tokens, dtype=np.int64)
    positions[:num_tokens] = new_positions
    slot_mapping = np.full(padded_tokens, -1, dtype=np.int64)
    slot_mapping[:num_tokens] = (block_table[token_seq, new_positions // block_size].astype(np.int64) * block_size
                                 + new_positions % block_size)
    padded_lens = np.zeros(padded_seqs, dtype=np.int32)
    padded_lens[:num_seqs] = seq_lens

    return ([block_table, slot_mapping, padded_lens, query_start, positions],  # StepMetadata's tensors, in order
            int(num_new.max(initial=0)), int(seq_lens.max(initial=0)), num_seqs, num_tokens)
