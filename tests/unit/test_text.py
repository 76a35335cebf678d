import pytest

from expertmesh.gateway.text import TextCodec, TextStream


@pytest.fixture(scope="module")
def codec(mixtral_dir):
    return TextCodec(mixtral_dir)


def stream_all(codec, ids, stop):
    stream, pieces = TextStream(codec, stop), []
    for i, token in enumerate(ids):
        delta = stream.push([token], final=i == len(ids) - 1)
        pieces.append(delta.text)
        if delta.stopped:
            return "".join(pieces), True
    return "".join(pieces), False


def test_streamed_pieces_concatenate_to_the_full_text(codec):
    text = "hello world, déjà vu — 日本語 def self return"
    ids = codec.encode(text)
    streamed, stopped = stream_all(codec, ids, [])
    assert streamed == codec.decode(ids) == text and not stopped


def test_incomplete_utf8_is_held_back(codec):
    ids = codec.encode("日本")
    stream = TextStream(codec, [])
    partial = [stream.push([t], final=False).text for t in ids[:-1]]
    assert all("\ufffd" not in p for p in partial)


def test_stop_string_ends_text_before_it_even_across_tokens(codec):
    text = "the ingestion of delas and more"
    ids = codec.encode(text)
    streamed, stopped = stream_all(codec, ids, ["of del"])
    assert stopped and streamed == "the ingestion "
    streamed, stopped = stream_all(codec, ids, ["nothing like it"])
    assert not stopped and streamed == text


def test_plain_chat_template(codec):
    prompt = codec.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"


def test_streamed_text_equals_the_full_decode_over_long_multibyte_outputs(codec):
    """Each push decodes a window of the latest ids only: the pieces must still add up to decoding all of them,
    and never show a half character, over a long output mixing scripts, symbols and code."""
    text = " ".join(f"step {i}: déjà vu — 日本語のテキスト ≥ {i}.3× µs, {{'k': [{i}, -1]}} naïve café Ωmega"
                    for i in range(40))
    ids = codec.encode(text)
    streamed, stopped = stream_all(codec, ids, [])
    assert streamed == codec.decode(ids) == text and not stopped
    stream = TextStream(codec, [])
    assert all("\ufffd" not in stream.push([t], final=False).text for t in ids)


def test_a_sentencepiece_style_tokenizer_keeps_its_spaces_when_streamed(tmp_path):
    """Metaspace decoders (Llama, Mistral) drop the space of a text's first word: decoding each new id alone would
    glue the words together, so each push decodes them after the ids before them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20 + ["a stream of words, each its own token"] * 20
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    codec = TextCodec(tmp_path)
    ids = codec.encode("the quick brown fox jumps over a stream of words")
    assert codec.decode(ids[1:2]) == codec.decode(ids[1:2]).lstrip()  # alone, a word loses its space
    streamed, _ = stream_all(codec, ids, [])
    assert streamed == codec.decode(ids) == "the quick brown fox jumps over a stream of words"


def held_back(stream):
    return len(stream._ids) - stream._read


def test_ids_that_add_no_text_are_not_decoded_again_and_again(codec):
    """A random model's picks are mostly special ids (decode skips them), and a logit_bias can force byte pieces
    that never make a character: the window the stream decodes at each push stays bounded (it grew with the
    output, a push's cost with it), and the text still adds up to decoding every id."""
    import random

    from expertmesh.gateway.text import HOLD_BACK_IDS
    pick = random.Random(0)
    specials = sorted(codec.skipped_ids)  # <s>, </s> here; a 152k-id random model's tokenizer is 97% special ids
    lead_byte = codec.tokenizer.get_vocab()["ã"]  # 0xE3 in the byte-level alphabet: a 3-byte character's start
    pieces = [i for i in range(codec.vocab_size) if i not in codec.skipped_ids and "\ufffd" in codec.decode([i])]
    words = codec.encode(" déjà vu — 日本語 def self return")
    for ids in ([pick.choice(specials) if pick.random() < 0.97 else pick.randrange(2, codec.vocab_size)
                 for _ in range(2000)],                                      # mostly special ids
                [lead_byte] * 2000,                                          # a character begun, never finished
                [pick.choice(pieces) for _ in range(2000)],                  # stray bytes
                [pick.choice([*words, *pieces, *specials * 20]) for _ in range(2000)]):
        stream, pieces_out, most = TextStream(codec, []), [], 0
        for i, token in enumerate(ids):
            pieces_out.append(stream.push([token], final=i == len(ids) - 1).text)
            most = max(most, held_back(stream))
        assert "".join(pieces_out) == codec.decode(ids)
        assert most <= HOLD_BACK_IDS
    # a character split over its bytes with special ids between them is still whole
    one = codec.encode("日")
    stream = TextStream(codec, [])
    text = "".join(stream.push([t, *specials * 10], final=False).text for t in one)
    assert text == "日"
