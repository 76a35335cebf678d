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
