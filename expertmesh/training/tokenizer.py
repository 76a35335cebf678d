"""Train the byte-level BPE tokenizer on the corpus's train split and save it in Hugging Face form.
tokenizer.json plus tokenizer_config.json, with <s> (bos, added to every encoding) and </s> (eos).

    python -m expertmesh.training.tokenizer --data data/corpus --vocab-size 6144
"""

import argparse
import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)  # ids 0 and 1, in this order


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so no text is ever out of vocabulary."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the 256 bytes plus {len(SPECIAL_TOKENS)} special tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Like Mixtral's tokenizer: every encoded text starts with <s>; </s> is added by whoever ends a text.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)])
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path, model_max_length: int = 1024) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
              "unk_token": None, "pad_token": None, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def corpus_texts(jsonl: Path) -> Iterator[str]:
    with open(jsonl, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)["text"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/corpus", help="corpus folder holding train.jsonl")
    parser.add_argument("--out", default=None, help="folder for tokenizer.json (default: DATA/tokenizer)")
    parser.add_argument("--vocab-size", type=int, default=6144)
    args = parser.parse_args(argv)
    train_file = Path(args.data) / "train.jsonl"
    if not train_file.is_file():
        raise SystemExit(f"tokenizer: {train_file} missing; build it with `python -m expertmesh.training.corpus`")
    tokenizer = train_tokenizer(corpus_texts(train_file), args.vocab_size)
    out = Path(args.out) if args.out else Path(args.data) / "tokenizer"
    save_tokenizer(tokenizer, out)
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens -> {out / 'tokenizer.json'}")


if __name__ == "__main__":
    main()
