"""Tokenize the corpus once into compact packed arrays, and sample training windows from them.
Each document is <s> text </s>; documents are concatenated, so a window may span a boundary.

    python -m expertmesh.training.dataset --data data/corpus
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from expertmesh.training.corpus import DOMAINS, SPLITS
from expertmesh.training.tokenizer import EOS_TOKEN


def pack_documents(texts: list[str], domains: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token stream (uint16) and, per token, the index of its document's domain in DOMAINS (uint8)."""
    if tokenizer.get_vocab_size() > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocabulary of {tokenizer.get_vocab_size()} does not fit uint16 token ids")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    token_chunks, domain_chunks = [], []
    for encoding, domain in zip(tokenizer.encode_batch(texts), domains):
        ids = encoding.ids + [eos_id]  # the encoding already starts with <s>
        token_chunks.append(np.asarray(ids, dtype=np.uint16))
        domain_chunks.append(np.full(len(ids), DOMAINS.index(domain), dtype=np.uint8))
    if not token_chunks:
        return np.zeros(0, np.uint16), np.zeros(0, np.uint8)
    return np.concatenate(token_chunks), np.concatenate(domain_chunks)


def pack_corpus(data: Path, tokenizer: Tokenizer, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = {"domains": list(DOMAINS), "tokens": {}}
    for split in SPLITS:
        with open(data / f"{split}.jsonl", encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
        tokens, domain_ids = pack_documents([r["text"] for r in records], [r["domain"] for r in records], tokenizer)
        np.save(out / f"{split}.tokens.npy", tokens)
        np.save(out / f"{split}.domains.npy", domain_ids)
        counts = np.bincount(domain_ids, minlength=len(DOMAINS))
        summary["tokens"][split] = {d: int(c) for d, c in zip(DOMAINS, counts)}
        text_bytes = sum(len(r["text"].encode("utf-8")) for r in records)
        print(f"{split:10s} {len(records):5d} documents {len(tokens):9d} tokens "
              f"({text_bytes / max(len(tokens), 1):.2f} bytes/token)", flush=True)
    (out / "packed.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def load_split(packed: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    tokens_file = packed / f"{split}.tokens.npy"
    if not tokens_file.is_file():
        raise FileNotFoundError(f"{tokens_file} missing; run `python -m expertmesh.training.dataset`")
    return np.load(tokens_file), np.load(packed / f"{split}.domains.npy")


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq_len inputs and their next-token targets, drawn with a seeded generator."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"token stream of {len(tokens)} is too short for windows of {seq_len} + 1")
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(seq_len + 1)
    windows = tokens[offsets.to(tokens.device)].long()
    return windows[:, :-1], windows[:, 1:]


def domain_windows(tokens: np.ndarray, domain_ids: np.ndarray, domain: int, seq_len: int,
                   max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 over one domain's tokens, for evaluation."""
    stream = tokens[domain_ids == domain]
    count = (len(stream) - 1) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    starts = np.arange(count) * seq_len
    return torch.from_numpy(stream[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/corpus")
    parser.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: DATA/tokenizer)")
    args = parser.parse_args(argv)
    data = Path(args.data)
    tokenizer_file = Path(args.tokenizer or data / "tokenizer") / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SystemExit(f"dataset: {tokenizer_file} missing; run `python -m expertmesh.training.tokenizer`")
    pack_corpus(data, Tokenizer.from_file(str(tokenizer_file)), data / "packed")


if __name__ == "__main__":
    main()
