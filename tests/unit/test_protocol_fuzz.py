"""The wire decoder under random and mutated frames (hypothesis): it returns a well-formed message or raises
ProtocolError, never anything else, and a tensor it returns always has exactly the bytes its header announced."""
import msgpack
import torch
from hypothesis import given, settings, strategies as st

from expertmesh.transport.protocol import (_MESSAGE_TYPES, Dispatch, Hello, Message, ProtocolError, StepPlan,
                                           decode_frames, encode_frames)

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True)
VALID = [encode_frames(m) for m in (
    Dispatch(3, 2, 1, torch.ones(4, 8), torch.arange(8, dtype=torch.int32).view(4, 2), torch.rand(4, 2)),
    Hello(0, 4, 8, b"\x00" * 64), StepPlan(1, 7, [3, 5]))]


def decodes_or_refuses(frames) -> None:
    try:
        message = decode_frames(frames)
    except ProtocolError:
        return
    assert isinstance(message, Message)
    type(message)._split_fields()
    for tensor in message.tensors():
        assert isinstance(tensor, torch.Tensor)


@SETTINGS
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_random_frames(frames):
    decodes_or_refuses(frames)


scalars = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                       | st.text(max_size=8) | st.binary(max_size=8), lambda inner: st.lists(inner, max_size=4),
                       max_leaves=12)


@SETTINGS
@given(st.sampled_from(sorted(_MESSAGE_TYPES)) | st.integers(-3, 300), st.lists(scalars, max_size=16),
       st.lists(scalars, max_size=4), st.lists(st.binary(max_size=96), max_size=4))
def test_headers_of_any_shape(tag, fields, metas, buffers):
    decodes_or_refuses([msgpack.packb([tag, fields, metas], use_bin_type=True), *buffers])


@SETTINGS
@given(st.sampled_from(range(len(VALID))), st.data())
def test_mutated_valid_messages(which, data):
    frames = [bytes(f) for f in VALID[which]]
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    action = data.draw(st.sampled_from(["flip", "truncate", "extend", "drop"]))
    if action == "flip" and frame:
        at = data.draw(st.integers(0, len(frame) - 1))
        frame[at] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        frame = frame[:data.draw(st.integers(0, len(frame)))]
    elif action == "extend":
        frame += data.draw(st.binary(min_size=1, max_size=16))
    frames[index] = bytes(frame)
    if action == "drop":
        frames.pop(index)
    decodes_or_refuses(frames)


def test_typed_fields_are_checked():
    header = msgpack.packb([StepPlan.TAG, [1, "seven", [3]], []], use_bin_type=True)
    try:
        decode_frames([header])
    except ProtocolError as exc:
        assert "step" in str(exc)
    else:
        raise AssertionError("a str step was accepted")
