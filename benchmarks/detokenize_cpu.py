"""The gateway's incremental detokenizer (gateway/text.py, TextStream) on ids drawn at random from a vocabulary, as
`bench gateway`'s stand-in draws them and as a random-weight model's picks spread: characters a token, ids held
back (pieces of a multi-byte character not complete yet, decoded again with each next id) and µs a push, per
checkpoint's tokenizer; and one stream of 4096 ids of a lone lead byte (the first checkpoint's), which no character
ever completes.

    python benchmarks/detokenize_cpu.py models/expertmesh-mini /tmp/tok_mixtral /tmp/tok_qwen3
"""
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from expertmesh.gateway.text import TextCodec, TextStream  # noqa: E402


def main(models: list[str], streams: int = 200, tokens: int = 96) -> None:
    for model in models:
        codec = TextCodec(Path(model))
        pick = random.Random(0)
        pushes = held = chars = 0
        start = time.perf_counter()
        for _ in range(streams):
            stream = TextStream(codec, [])
            for i in range(tokens):
                delta = stream.push([pick.randrange(2, codec.vocab_size)], final=i == tokens - 1)
                pushes += 1
                held += len(stream._ids) - stream._read  # ids decode keeps, not yet taken as text
                chars += len(delta.text)
        seconds = time.perf_counter() - start
        print(f"{model}: vocabulary {codec.vocab_size}, {chars / pushes:.2f} characters a token, "
              f"{held / pushes:.1f} ids held back on average, {seconds / pushes * 1e6:.1f} us a push")
    # a character begun and never finished, as a logit_bias forcing one byte token would have it
    codec = TextCodec(Path(models[0]))
    lead_byte = codec.tokenizer.get_vocab()["\u00e3"]  # 0xE3 in the byte-level alphabet
    stream, start = TextStream(codec, []), time.perf_counter()
    for i in range(4096):
        stream.push([lead_byte], final=i == 4095)
    print(f"{models[0]}: 4096 ids of one lead byte in one stream, {(time.perf_counter() - start) * 1e3:.0f} ms")


if __name__ == "__main__":
    main(sys.argv[1:] or ["models/expertmesh-mini"])
