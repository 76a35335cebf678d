"""The wire format, and the only place it is defined: typed messages <-> msgpack header + raw tensor buffers.

A message travels as one header (msgpack: [tag, scalar fields, tensor metadata]) followed by one raw buffer
per tensor field. Backends move the buffers however suits them (zmq frames, UCX tagged sends into
preallocated tensors); nothing here copies a tensor, and nothing on the wire is pickled."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import msgpack
import torch


class ProtocolError(ValueError):
    """A received message does not match the wire format."""


_DTYPES: list[torch.dtype] = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64,
                              torch.uint8, torch.int8, torch.bool, torch.float64, torch.int16]
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


PACK_ALIGN = 16  # bytes: where each tensor of a packed message starts


def packed_offsets(metas: Sequence[TensorMeta]) -> tuple[list[int], int]:
    """Where a message's tensors sit when they share one buffer ("packed"): in field order, each at the next
    16-byte offset. Returns (byte offsets, total bytes). A sender whose tensors already lie so in one storage (as
    M2N's send buffers are carved) can send them as one frame. 16 bytes, not the item size: Triton compiles a
    kernel apart for a pointer that is not 16-byte aligned, so with item-size alignment a round's token count
    would pick the variant, and a variant first loaded while an NCCL receive is pending deadlocks (the load waits
    for the device to drain)."""
    offsets, end = [], 0
    for meta in metas:
        if any(dim < 0 for dim in meta.shape):
            raise ValueError(f"tensor shape {meta.shape} has a negative dimension")
        end += -end % PACK_ALIGN
        offsets.append(end)
        end += meta.nbytes
    return offsets, end


def packed_views(flat: torch.Tensor, metas: Sequence[TensorMeta]) -> list[torch.Tensor]:
    """Tensors laid out by packed_offsets in the uint8 buffer `flat` (views, no copy)."""
    offsets, _ = packed_offsets(metas)
    return [flat[start:start + meta.nbytes].view(meta.dtype).view(meta.shape) for start, meta in zip(offsets, metas)]


def packed_span(tensors: Sequence[torch.Tensor], max_bytes: int) -> torch.Tensor | None:
    """One uint8 view covering all tensors if they lie in one storage as packed_offsets places them and take at
    most max_bytes; else None."""
    offsets, total = packed_offsets([TensorMeta(t.dtype, tuple(t.shape)) for t in tensors])
    present = [(t, offset) for t, offset in zip(tensors, offsets) if t.numel() > 0]
    if not present or total > max_bytes:
        return None
    storage = present[0][0].untyped_storage()
    base = present[0][0].data_ptr() - present[0][1]
    for tensor, offset in present:
        if tensor.untyped_storage().data_ptr() != storage.data_ptr() or tensor.data_ptr() != base + offset:
            return None
    start = base - storage.data_ptr()
    if start < 0 or start + total > storage.nbytes():
        return None
    return torch.empty(0, dtype=torch.uint8, device=present[0][0].device).set_(storage, start, (total,))


_MESSAGE_TYPES: dict[int, type["Message"]] = {}


class Message:
    """Base of every wire message. Subclasses are dataclasses with a unique TAG; torch.Tensor fields
    travel as raw buffers, every other field must be msgpack-serialisable (ints, floats, str, lists, None)."""

    TAG: ClassVar[int]
    _tensor_fields: ClassVar[tuple[str, ...]]
    _scalar_fields: ClassVar[tuple[str, ...]]
    _scalar_types: ClassVar[tuple[str, ...]]  # their annotations, which decode_header holds received values to

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TAG in _MESSAGE_TYPES:
            raise TypeError(f"message tag {cls.TAG} used twice: {_MESSAGE_TYPES[cls.TAG].__name__}, {cls.__name__}")
        _MESSAGE_TYPES[cls.TAG] = cls

    @classmethod
    def _split_fields(cls) -> None:
        if "_tensor_fields" in cls.__dict__:
            return
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        cls._tensor_fields = tuple(f.name for f in fields if f.type in ("torch.Tensor", torch.Tensor))
        cls._scalar_fields = tuple(f.name for f in fields if f.name not in cls._tensor_fields)
        cls._scalar_types = tuple(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                                  for f in fields if f.name not in cls._tensor_fields)

    def tensors(self) -> list[torch.Tensor]:
        type(self)._split_fields()
        return [getattr(self, name) for name in self._tensor_fields]

    def encode_header(self) -> bytes:
        """The header; the tensors (self.tensors()) follow it as raw buffers, in field order."""
        type(self)._split_fields()
        scalars = [getattr(self, name) for name in self._scalar_fields]
        metas = []
        for tensor in self.tensors():
            if not tensor.is_contiguous():
                raise ProtocolError(f"{type(self).__name__}: tensors must be contiguous to travel without a copy")
            metas.append([_DTYPE_CODE[tensor.dtype], list(tensor.shape)])
        return msgpack.packb([self.TAG, scalars, metas], use_bin_type=True)


def _fits(value: Any, annotation: str) -> bool:
    """Whether a decoded scalar matches its field's annotation (the few forms the messages use)."""
    if annotation == "Any":
        return True
    if annotation.endswith(" | None"):
        return value is None or _fits(value, annotation[:-len(" | None")])
    if annotation.startswith("list[") and annotation.endswith("]"):
        return isinstance(value, list) and all(_fits(item, annotation[5:-1]) for item in value)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return type(value).__name__ == annotation  # bool, str, bytes


def _tensor_meta(item: Any) -> TensorMeta:
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (item[0], *item[1]))):
        raise ProtocolError(f"tensor metadata {item!r} is not [dtype code, [dims...]]")
    code, shape = item
    if not 0 <= code < len(_DTYPES) or any(dim < 0 for dim in shape):
        raise ProtocolError(f"tensor metadata {item!r}: unknown dtype code or a negative dimension")
    return TensorMeta(_DTYPES[code], tuple(shape))


def decode_header(header: bytes | memoryview) -> tuple[type[Message], list[Any], list[TensorMeta]]:
    """Parse a header into the message class, its scalar fields and the metadata of the buffers that follow;
    anything that does not match the message's fields is a ProtocolError, never a half-built message."""
    try:
        tag, scalars, metas = msgpack.unpackb(header, raw=False)
        cls = _MESSAGE_TYPES[tag]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"malformed message header: {exc!r}") from exc
    cls._split_fields()
    if not isinstance(scalars, list) or not isinstance(metas, list):
        raise ProtocolError(f"{cls.__name__}: header fields and tensors must be lists")
    if len(scalars) != len(cls._scalar_fields) or len(metas) != len(cls._tensor_fields):
        raise ProtocolError(f"{cls.__name__}: expected {len(cls._scalar_fields)} fields and "
                            f"{len(cls._tensor_fields)} tensors, got {len(scalars)} and {len(metas)}")
    for name, annotation, value in zip(cls._scalar_fields, cls._scalar_types, scalars):
        if not _fits(value, annotation):
            raise ProtocolError(f"{cls.__name__}.{name}: {value!r} is not {annotation}")
    return cls, scalars, [_tensor_meta(item) for item in metas]


def build_message(cls: type[Message], scalars: list[Any], tensors: Sequence[torch.Tensor]) -> Message:
    kwargs = dict(zip(cls._scalar_fields, scalars))
    kwargs.update(zip(cls._tensor_fields, tensors))
    return cls(**kwargs)


def tensor_to_buffer(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes as a memoryview that shares its storage (no copy)."""
    if tensor.device.type != "cpu":
        raise ProtocolError(f"this backend carries CPU tensors only, got one on {tensor.device}")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def tensor_from_buffer(meta: TensorMeta, buffer: memoryview | bytes) -> torch.Tensor:
    """A tensor viewing a received buffer (no copy)."""
    if len(buffer) != meta.nbytes:
        raise ProtocolError(f"tensor buffer of {len(buffer)} bytes, header says {meta.nbytes} for {meta}")
    if meta.nbytes == 0:
        return torch.empty(meta.shape, dtype=meta.dtype)
    with warnings.catch_warnings():  # received buffers are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=meta.dtype).view(meta.shape)


def encode_frames(message: Message) -> list[bytes | memoryview]:
    return [message.encode_header(), *(tensor_to_buffer(t) for t in message.tensors())]


def decode_frames(frames: Sequence[memoryview | bytes]) -> Message:
    if not frames:
        raise ProtocolError("empty message")
    cls, scalars, metas = decode_header(frames[0])
    if len(frames) - 1 != len(metas):
        raise ProtocolError(f"{cls.__name__}: header announces {len(metas)} tensors, {len(frames) - 1} buffers came")
    return build_message(cls, scalars, [tensor_from_buffer(m, b) for m, b in zip(metas, frames[1:])])


# ---- data plane: attention node <-> expert node -------------------------------------------------------------

@dataclass
class Hello(Message):
    """Attention node -> expert node when connecting: who it is, so the expert node can check the plan; on ipc
    links, the handle of its receive region for that expert node (m2n/ipc.py). On lockstep links, where it runs
    and the link's backend as it chose it (m2n/link_plan.py), which the expert node must have chosen too."""
    TAG: ClassVar[int] = 1
    attention_node: int
    num_layers: int
    num_experts: int
    region: bytes = b""
    host: str = ""
    device: str = ""
    link: str = ""


@dataclass
class HelloReply(Message):
    """Expert node -> attention node: the (layer, expert) pairs it holds, flattened as layer * E + expert."""
    TAG: ClassVar[int] = 2
    expert_node: int
    held: list[int]
    region: bytes = b""  # on ipc links: the handle of its receive region for that attention node
    host: str = ""  # on lockstep links, as in Hello
    device: str = ""
    link: str = ""


@dataclass
class Dispatch(Message):
    """Tokens of one microbatch for one MoE layer, sent once to each expert node that holds one of their
    experts. expert_ids is -1 where the chosen expert is computed on another node (its weight is then unused)."""
    TAG: ClassVar[int] = 3
    step: int
    layer: int
    microbatch: int
    hidden: torch.Tensor  # [tokens, hidden]
    expert_ids: torch.Tensor  # [tokens, top_k] int32
    expert_weights: torch.Tensor  # [tokens, top_k] float32


@dataclass
class Combine(Message):
    """Expert node -> attention node: one weighted partial sum per dispatched token."""
    TAG: ClassVar[int] = 4
    step: int
    layer: int
    microbatch: int
    partial: torch.Tensor  # [tokens, hidden]


@dataclass
class ExpertError(Message):
    """Expert node -> attention node: the Dispatch for (step, layer, microbatch) failed."""
    TAG: ClassVar[int] = 5
    step: int
    layer: int
    microbatch: int
    error: str


@dataclass
class Credentials(Message):
    """Any node or the gateway -> a node, first on every control and data connection: the cluster's secret
    (peers.py). A node drops what a connection that has not presented it sends."""
    TAG: ClassVar[int] = 7
    secret: str


@dataclass
class StepPlan(Message):
    """Attention node -> expert node, once per step on the lockstep M2N (m2n/lockstep.py): the step's rounds, as
    the tokens of each microbatch. Every MoE layer of the step is then one round per microbatch, in the order
    (layer, microbatch), whose tensors travel on the data links, not here."""
    TAG: ClassVar[int] = 6
    attention_node: int
    step: int
    tokens: list[int]


# ---- control plane: gateway <-> attention node ---------------------------------------------------------------

# what SamplingParams.grammar's source is: a JSON schema, any JSON object (source unused), a regular expression, an
# EBNF grammar (xgrammar's dialect), or an xgrammar structural tag (tool calls: gateway/tools.py)
GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")


@dataclass
class SamplingParams:
    """Per-request sampling; temperature 0 means greedy."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # return the sampled token's logprob and this many top alternatives
    # vLLM's sampling parameters (ops/sampling.py, ops/logits_processors.py); the defaults ask for nothing
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # no EOS or stop_token_ids before this many output tokens
    stop_token_ids: list[int] = field(default_factory=list)  # finish ('stop') when one is sampled
    logit_bias: list[list] = field(default_factory=list)  # [[token id, bias], ...]: msgpack map keys are not ints
    # structured output (attention_node/grammar.py): [kind, source], kind one of GRAMMAR_KINDS; None: free text
    grammar: list[str] | None = None

    def to_list(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @classmethod
    def from_list(cls, values: list[Any]) -> "SamplingParams":
        return cls(*values)


@dataclass
class AddRequest(Message):
    TAG: ClassVar[int] = 10
    request_id: str
    prompt_ids: list[int]
    sampling: list[Any]  # SamplingParams.to_list()
    # the prompt's logprobs with this many alternatives per position (vLLM's prompt_logprobs, completions' echo);
    # None: not computed, so that only the requests that ask pay for a log-softmax over every prompt position
    prompt_logprobs: int | None = None


@dataclass
class AbortRequest(Message):
    TAG: ClassVar[int] = 11
    request_id: str


@dataclass
class StepOutputs(Message):
    """Attention node -> gateway after each step: one new token per listed request; finish_reasons[i] is None
    while request i runs, else 'stop', 'length', 'abort' or 'error' (then errors[i] says why)."""
    TAG: ClassVar[int] = 12
    request_ids: list[str]
    token_ids: list[int]
    finish_reasons: list[str | None]
    errors: list[str | None] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)  # per request: None or [logprob, [[token, logprob], ...]]
    # per request, with its first token: seconds from its arrival at the node to its first step; else None
    queue_seconds: list[float | None] = field(default_factory=list)
    # per request, with its first token when its AddRequest asked: one entry per prompt token, None for the first
    # (nothing precedes it), else [logprob, rank in the vocabulary (1 = most likely), [[token, logprob], ...]]
    prompt_logprobs: list[Any] = field(default_factory=list)


@dataclass
class StatusRequest(Message):
    TAG: ClassVar[int] = 13


@dataclass
class Status(Message):
    """Attention node -> gateway: readiness, load and counters for /health and /metrics."""
    TAG: ClassVar[int] = 14
    attention_node: int
    ready: bool
    running: int
    waiting: int
    queued_tokens: int
    prompt_tokens: int
    generated_tokens: int
    steps: int
    link_bytes: list[int]  # bytes sent to each expert node (index = expert node)
    link_messages: list[int]
    link_bytes_received: list[int]
    error: str | None = None
    phase_names: list[str] = field(default_factory=list)  # where the node's time went (PhaseClock.totals)
    phase_seconds: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    kv_blocks_used: int = 0  # KV-cache blocks owned by sequences, of kv_blocks_total
    kv_blocks_total: int = 0
    preemptions: int = 0  # sequences preempted (by recomputation) since start
    process: int = 0  # the node's process id: a new one means the node was restarted (what it held is gone)
    gpu_busy_seconds: float = 0.0  # device time of its compute spans (telemetry.GpuMeter), on a GPU
    gpu_spans: int = 0
    link_backends: list[str] = field(default_factory=list)  # the backend of its link to each expert node
    eager_steps: int = 0  # of `steps`, those run eagerly (not replayed as CUDA graphs: long prefills, CPU)


@dataclass
class ExpertStatus(Message):
    """Expert node -> gateway (control plane): readiness, work done and where the time went."""
    TAG: ClassVar[int] = 15
    expert_node: int
    ready: bool
    tokens_computed: int
    phase_names: list[str]
    phase_seconds: list[float]
    wall_seconds: float
    process: int = 0  # the node's process id: a new one means the node was restarted
    gpu_busy_seconds: float = 0.0  # device time of its expert compute (telemetry.GpuMeter), on a GPU
    gpu_spans: int = 0


@dataclass
class TraceControl(Message):
    """Gateway -> any node: start recording a timeline (record=True), or stop and send it back."""
    TAG: ClassVar[int] = 16
    record: bool


@dataclass
class NodeTrace(Message):
    """A node's timeline since tracing started: [phase, start_us, duration_us, microbatch] per event; on a GPU,
    the last replay of each span its CUDA graphs time, the same way (telemetry.GpuMeter.timeline)."""
    TAG: ClassVar[int] = 17
    node: str
    events: list[list[Any]]
    gpu_events: list[list[Any]] = field(default_factory=list)
