"""A step's block table on the host, two ways: flattened from every sequence's block list, and gathered from the
block manager's mirrored table (BlockManager.tables). 256 sequences of 3.5k tokens in 16-token blocks, as the
eleventh session's long-context GPU rows decoded (RESULTS.md).

    python benchmarks/step_tables_cpu.py --seqs 256 --tokens 3581
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from expertmesh.kv.block_manager import BlockManager  # noqa: E402
from expertmesh.kv.metadata import step_tables  # noqa: E402


class Tokens:
    def __init__(self, num_tokens: int) -> None:
        self.num_tokens, self.block_ids, self.block_row = num_tokens, [], -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=3581)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    blocks = BlockManager(args.seqs * (args.tokens // 16 + 2), 16)
    seqs = [Tokens(args.tokens) for _ in range(args.seqs)]
    for seq in seqs:
        blocks.allocate(seq)
    entries = [(s.block_ids, args.tokens - 1, 1) for s in seqs]
    rows = [s.block_row for s in seqs]
    width = -(-8192 // 16)  # a graph's table: blocks for the whole context
    for name, mirror in (("from the lists", None), ("from the mirrored table", (blocks.tables, rows))):
        started = time.perf_counter()
        for _ in range(args.reps):
            step_tables(entries, 16, (args.seqs, args.seqs), width, mirror)
        print(f"{name}: {(time.perf_counter() - started) / args.reps * 1e3:.2f} ms a step")


if __name__ == "__main__":
    main()
