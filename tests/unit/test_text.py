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
