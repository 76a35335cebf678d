"""Configuration: one dataclass per concern, gathered in `Config`, read from YAML/JSON or CLI flags.

Configuration flows one way: file/flags -> these dataclasses -> constructors. No module reads the environment."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .model.spec import ModelSpec

# transport backends that run the lockstep M2N (m2n/); lockstep: each link on its own, by locality (m2n/link_plan.py)
LOCKSTEP_BACKENDS = ("nccl", "gloo", "ipc", "ucx-lockstep", "lockstep")
IPC_COPIES = ("engine", "sm")  # who moves an ipc send's bytes: the driver's copies, or one SM kernel (m2n/ipc_copy.py)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def read_structured(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file as a dict."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml
        return yaml.safe_load(text) or {}
    return json.loads(text)


@dataclass
class ModelConfig:
    path: str = "models/expertmesh-mini"  # a Hugging Face checkpoint directory
    dtype: str = "float32"
    device: str = "cpu"  # "cuda" puts each node on its own GPU (see ClusterConfig.*_gpus)
    torch_threads: int = 1  # intra-op threads per node process: several nodes share a host's cores

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass
class TransportConfig:
    # Data path between attention and expert nodes. Lockstep rounds, no host on the data's path (m2n/): nccl (GPUs,
    # each node on its own GPU), ipc (GPUs of one host, CUDA IPC; nodes may share a GPU: run CUDA MPS for
    # concurrency), gloo (CPU) or ucx-lockstep (UCX: CPU, or RDMA across hosts), or lockstep: each link's own by the
    # locality and device of its ends (ipc or nccl on GPUs, gloo or ucx-lockstep on CPU: m2n/link_plan.py). Messages,
    # the host on the data's path: ucx or zmq. auto: lockstep on GPUs; on CPU ucx if ucxx imports, else zmq (the
    # message M2N outlives a lost expert node alone, where lockstep links restart the whole world).
    backend: str = "auto"
    connect_timeout_s: float = 60.0  # an expert node must answer the handshake within this
    recv_timeout_s: float = 30.0  # an expert node must answer a dispatch within this
    # Message M2N (ucx, zmq): a lost expert node's experts with no live replica hold the attention node's steps
    # until the node rejoins; requests waiting there fail after this long.
    rejoin_wait_s: float = 30.0
    # Who progresses UCX (ucx, ucx-lockstep): "thread" (a progress thread; idle processes sleep) or "polling" (the event
    # loop spins: lower latency per message, one core busy per process).
    ucx_progress_mode: str = "thread"
    # ipc links: who moves a send's bytes, "engine" (the driver's copies, then a signal kernel) or "sm" (one kernel
    # copies and signals: m2n/ipc_copy.py). engine until sm is measured against it on the GPUs at hand.
    ipc_copy: str = "engine"  # one of IPC_COPIES
    # Link emulation on the attention->expert links (experiments on one host; 0 = off):
    emulated_latency_us: float = 0.0  # added one-way latency per message
    emulated_bandwidth_gbps: float = 0.0  # bandwidth cap per link and direction


@dataclass
class EngineConfig:
    """The attention node's continuous batching."""
    max_num_seqs: int = 32  # sequences in the running batch
    max_model_len: int | None = None  # tokens per sequence; default: the model's max_position_embeddings
    max_batch_tokens: int = 2048  # new tokens per step (and per M2N round); longer prompts prefill in chunks
    microbatches: int = 1  # ping-pong microbatches per step
    # while sequences decode, steps new prompts may wait to join together (0: at once; attention_node/scheduler.py)
    max_waiting_steps: int = 0
    block_size: int = 16  # tokens per KV-cache block (a power of two, 8..256)
    # CUDA: fraction of the device's total memory this process may use; the KV cache gets what the weights and a
    # margin for activations leave of it (kv/cache.py::num_blocks_for). vLLM's --gpu-memory-utilization.
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # KV-cache blocks; overrides the sizing above (and the CPU default)
    enforce_eager: bool = False  # no CUDA graphs: every step runs eagerly (vLLM's flag)
    # steps that carry prompt tokens (prefill chunks, alone or beside decodes) of up to this many new tokens replay
    # CUDA graphs too, padded to a bucket (attention_node/cuda_graphs.py); longer ones run eagerly; 0: all such steps
    # run eagerly. None: every step (max_batch_tokens). vLLM caps its graphs at 512 tokens; here a step of 256
    # decodes and a prompt's chunk passes that, and at 256 in flight a cap of 512 left 26% of the steps eager and
    # served 19-31% fewer tokens than no cap (benchmarks/RESULTS.md, ninth session)
    prefill_graph_tokens: int | None = None
    # schedule and launch step N+1 while step N runs, its decode inputs N's tokens on the device (vLLM's
    # --async-scheduling; attention_node/node.py). None: on for CUDA, where it served 13-42% more tokens on
    # 2 x H200 (benchmarks/RESULTS.md, seventh session), off on CPU, where a launch is the whole step and it can
    # only delay each token by one
    async_scheduling: bool | None = None

    def async_scheduling_on(self, device: str) -> bool:
        return device == "cuda" if self.async_scheduling is None else self.async_scheduling

    def graph_prefill_limit(self) -> int:
        """prefill_graph_tokens, within what a step may feed."""
        if self.prefill_graph_tokens is None:
            return self.max_batch_tokens
        return min(self.prefill_graph_tokens, self.max_batch_tokens)

    def context_len(self, spec: "ModelSpec") -> int:
        """Tokens a sequence may hold (prompt + output): max_model_len, capped by the model's positions."""
        return min(self.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Model ids a request may name (vLLM's --served-model-name); the first is what /v1/models shows and responses
    # report. Default: the model directory's name, and model.path as given (vLLM's default) also accepted.
    served_model_names: list[str] = field(default_factory=list)
    node_timeout_s: float = 10.0  # an attention node silent this long is declared dead
    # A request that finds no attention node ready (restarting, or waiting for a lost expert node) waits this long for
    # one, then gets 503 with Retry-After.
    node_wait_s: float = 10.0
    predictor: str | None = None  # domain predictor (.npz, `expertmesh place`): rebatch requests by predicted domain
    api_key: str | None = None  # when set, /v1/* and /admin/* need `Authorization: Bearer <key>` (vLLM's --api-key)
    # Admission: requests in flight (queued or running) and their prompt tokens, past which /v1/* answers 429 with
    # Retry-After instead of queueing without bound.
    max_pending_requests: int = 1024
    max_pending_tokens: int = 1 << 20
    # Deadline of a request, from its arrival, past which it is aborted at its node and answered 504 (an error event
    # on a stream); a request's own `timeout` field may only shorten it. None: no deadline.
    request_timeout_s: float | None = None
    # Gateway processes sharing the HTTP port (SO_REUSEPORT: the kernel spreads connections over them), each with its
    # share of the admission bounds; /metrics sums them all. One process's CPU per streamed token (50-70 us on our
    # hosts since the fourteenth session, RESULTS.md) caps what it can stream near 20k tokens/s (vLLM's
    # --api-server-count).
    workers: int = 1
    # Tokens a stream's chunk waits to gather before it is written (SGLang's and vLLM's --stream-interval); the first
    # token and the last go at once. Each chunk costs the gateway a write and an event's JSON, most of its CPU per
    # streamed token (RESULTS.md): 4 streams a quarter of the chunks, smoother streams at 1.
    stream_interval: int = 1


@dataclass
class ClusterConfig:
    attention_nodes: int = 1
    expert_nodes: int = 2  # 0: colocated, each attention node runs every expert itself (no transport)
    placement: str | None = None  # placement JSON; default: contiguous blocks of experts per node
    topology: str | None = None  # cluster description (domains of the nodes, link costs; placement/topology.py)
    # Filled in by the launcher (free ports on this host), or given for multi-host deployments.
    attention_addresses: list[str] = field(default_factory=list)  # control address of each attention node
    expert_addresses: list[str] = field(default_factory=list)  # data address of each expert node
    expert_control_addresses: list[str] = field(default_factory=list)  # status/trace address of each expert node
    dist_address: str | None = None  # torch.distributed rendezvous (tcp://host:port) of the nccl/gloo backends
    # The host of each node as transport.backend=lockstep sees it (peers on one host: ipc or gloo; on two: nccl or
    # ucx-lockstep). Default: the host of the node's address. Given, e.g. to run cross-host links on one machine.
    attention_hosts: list[str] = field(default_factory=list)
    expert_hosts: list[str] = field(default_factory=list)
    # A Ray cluster to start the nodes on (its head's host:port, or auto), each where a placement group puts it
    # (launcher/ray_cluster.py); None: processes on this host (launcher/local.py).
    ray_address: str | None = None
    # Ray resources each role's nodes ask of their host besides cores, GPU and GPU type (as Ray Serve's
    # ray_actor_options.resources), e.g. {"expert": {"compute_host": 1}}; roles: attention, expert.
    ray_resources: dict[str, dict[str, float]] = field(default_factory=dict)
    # Presented first on every node-to-node and gateway-to-node connection (transport/peers.py); the launcher makes
    # one per cluster. None: every peer is trusted.
    secret: str | None = None
    # With model.device == "cuda": the GPU of each node; default attention node i -> GPU i,
    # expert node j -> GPU attention_nodes + j (modulo the GPUs there are).
    attention_gpus: list[int] = field(default_factory=list)
    expert_gpus: list[int] = field(default_factory=list)
    # The GPU type each role's nodes must find (planner/gpus.py names: H100, H200, H20, L40S, A100, or a device-name
    # substring), as `expertmesh plan` chose it; a node on another type refuses to start. None: any.
    attention_gpu_type: str | None = None
    expert_gpu_type: str | None = None
    # Under CUDA MPS: the percentage of a GPU's SMs each role's nodes may use (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, set
    # in each node before CUDA starts), so that one GPU stands in for a weaker type per role. None: all of them.
    attention_sm_percent: int | None = None
    expert_sm_percent: int | None = None

    def sm_percent(self, role: str) -> int | None:
        return self.attention_sm_percent if role == "attention" else self.expert_sm_percent


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def node_device(self, role: str, index: int) -> str:
        """Where node `index` of `role` ("attention" or "expert") computes: "cpu" or "cuda:N"."""
        if self.model.device == "cpu":
            return "cpu"
        chosen = self.cluster.attention_gpus if role == "attention" else self.cluster.expert_gpus
        if index < len(chosen):
            return f"cuda:{chosen[index]}"
        offset = 0 if role == "attention" else self.cluster.attention_nodes
        return f"cuda:{(offset + index) % max(1, torch.cuda.device_count())}"

    def validate(self) -> "Config":
        backend = self.transport.backend
        if backend not in ("auto", "ucx", "zmq", "inproc") + LOCKSTEP_BACKENDS:
            raise ConfigError(f"transport.backend={backend!r}; choose auto, ucx, zmq, nccl, ipc, gloo, ucx-lockstep or "
                              f"lockstep")
        for role, hosts, count in (("attention", self.cluster.attention_hosts, self.cluster.attention_nodes),
                                   ("expert", self.cluster.expert_hosts, self.cluster.expert_nodes)):
            if hosts and len(hosts) != count:
                raise ConfigError(f"cluster.{role}_hosts={hosts} names {len(hosts)} hosts for {count} {role} nodes")
        if backend in ("nccl", "gloo", "ipc") and self.model.device != ("cpu" if backend == "gloo" else "cuda"):
            raise ConfigError(f"transport.backend={backend} links {'CPU processes' if backend == 'gloo' else 'GPUs'}"
                              f", not model.device={self.model.device}: use {'nccl or ipc' if backend == 'gloo' else 'gloo'}")
        if self.transport.ipc_copy not in IPC_COPIES:
            raise ConfigError(f"transport.ipc_copy={self.transport.ipc_copy!r}; choose one of {IPC_COPIES}")
        if self.model.device not in ("cpu", "cuda"):
            raise ConfigError(f"model.device={self.model.device!r}; choose cpu or cuda")
        if self.model.dtype not in _DTYPES:
            raise ConfigError(f"model.dtype={self.model.dtype!r}; choose one of {sorted(_DTYPES)}")
        if self.cluster.attention_nodes < 1 or self.cluster.expert_nodes < 0:
            raise ConfigError(f"need at least one attention node and zero or more expert nodes (0: experts colocated "
                              f"in each attention node), got {self.cluster.attention_nodes} and "
                              f"{self.cluster.expert_nodes}")
        names = self.gateway.served_model_names
        if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
            raise ConfigError(f"gateway.served_model_names={names!r}; must be a list of non-empty names")
        if self.gateway.request_timeout_s is not None and not self.gateway.request_timeout_s > 0:
            raise ConfigError(f"gateway.request_timeout_s={self.gateway.request_timeout_s} must be > 0 (or null: none)")
        if self.gateway.max_pending_requests < 1 or self.gateway.max_pending_tokens < 1:
            raise ConfigError(f"gateway.max_pending_requests={self.gateway.max_pending_requests} and "
                              f"max_pending_tokens={self.gateway.max_pending_tokens} must be >= 1")
        if self.gateway.workers < 1:
            raise ConfigError(f"gateway.workers={self.gateway.workers}; must be >= 1")
        if self.gateway.stream_interval < 1:
            raise ConfigError(f"gateway.stream_interval={self.gateway.stream_interval}; must be >= 1 (tokens a chunk)")
        if self.engine.microbatches < 1:
            raise ConfigError(f"engine.microbatches={self.engine.microbatches}; must be >= 1")
        for role in ("attention", "expert"):
            share = self.cluster.sm_percent(role)
            if share is not None and (not 1 <= share <= 100 or self.model.device != "cuda"):
                raise ConfigError(f"cluster.{role}_sm_percent={share}: a share of a GPU's SMs, 1 to 100, with "
                                  f"model.device=cuda (got {self.model.device})")
        if self.engine.max_num_seqs < 1 or self.engine.max_batch_tokens < 1:
            raise ConfigError("engine.max_num_seqs and engine.max_batch_tokens must be >= 1")
        if self.engine.max_waiting_steps < 0:
            raise ConfigError(f"engine.max_waiting_steps={self.engine.max_waiting_steps}; must be >= 0")
        if self.engine.prefill_graph_tokens is not None and self.engine.prefill_graph_tokens < 0:
            raise ConfigError(f"engine.prefill_graph_tokens must be >= 0 (0: steps with prompts run eagerly), got "
                              f"{self.engine.prefill_graph_tokens}")
        if self.engine.max_batch_tokens < self.engine.max_num_seqs:
            raise ConfigError(f"engine.max_batch_tokens={self.engine.max_batch_tokens} < engine.max_num_seqs="
                              f"{self.engine.max_num_seqs}: every running sequence feeds a token each step")
        block_size = self.engine.block_size
        if not 8 <= block_size <= 256 or block_size & (block_size - 1):
            raise ConfigError(f"engine.block_size={block_size}; must be a power of two from 8 to 256")
        if not 0.0 < self.engine.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"engine.gpu_memory_utilization={self.engine.gpu_memory_utilization}; "
                              f"must be in (0, 1]")
        if self.engine.num_kv_blocks is not None and self.engine.num_kv_blocks < 1:
            raise ConfigError(f"engine.num_kv_blocks={self.engine.num_kv_blocks}; must be >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}; known: {sorted(sections)}")
        kwargs = {}
        for name, section in data.items():
            section_cls = sections[name].default_factory  # type: ignore[misc]
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(section or {}) - known
            if bad:
                raise ConfigError(f"unknown keys {sorted(bad)} in config section {name!r}; known: {sorted(known)}")
            kwargs[name] = section_cls(**(section or {}))
        return cls(**kwargs).validate()

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_structured(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))
