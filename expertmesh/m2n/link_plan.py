"""Which lockstep backend each (attention node, expert node) link takes under `transport.backend=lockstep` (what
`auto` means on GPUs): a rule of the two ends' locality and device, applied alike on every node from the config.

The rule, from the figures in benchmarks/RESULTS.md (issue 10 and 11 sections):
- GPUs on one host: **ipc**. A round over CUDA IPC with graphs on both sides takes 15-21 µs on one H200 and 41-55 µs
  across two over NVLink, 2.0-2.6x faster than NCCL's all_to_all_single in the same run; our links over NCCL have a
  millisecond floor per round trip there (open).
- GPUs on two hosts: **nccl**. CUDA IPC cannot reach another host; NCCL's own send/recv takes 47-61 µs one way
  between H200s where the UCX message path takes 430-610 µs, NCCL drives InfiniBand/RoCE itself, and ucx-lockstep
  on CUDA memory is untested.
- CPU processes on one host: **gloo**. Its rounds ran from par with ucx-lockstep's to 3x faster at 1x1 and 2x2
  (2 busy cores: figures moving 2x between runs), and it runs no progress and notifier threads per process.
- CPU processes on two hosts: **ucx-lockstep**. What UCX links are for is RDMA between hosts (and shared memory or
  TCP where there is none); gloo only has TCP. Not measured across hosts yet (one machine here). Without ucxx
  installed the link fails at start with the reason, rather than falling back: name gloo then.

The locality of a node is its host as the config says: `cluster.attention_hosts`/`expert_hosts` when given (e.g.
to try cross-host links on one machine), else the host of its address (launchers fill the addresses: 127.0.0.1
on one host, each host's own on Ray). Every node computes the same plan from the same config, which the
torch.distributed world needs (its groups are made by every rank alike); the handshake checks that both ends of
each link agree."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ..config import Config

PER_LINK = "lockstep"  # transport.backend: the lockstep M2N, each link's backend by choose_link
DIST_BACKENDS = ("nccl", "gloo")  # links over one torch.distributed world


def choose_link(same_host: bool, device: str, peer_device: str) -> str:
    """The lockstep backend of a link between a node on `device` and one on `peer_device` ("cpu", "cuda",
    "cuda:N"), on one host or two (the reasons are in the module's docstring)."""
    kind, peer_kind = device.split(":")[0], peer_device.split(":")[0]
    if kind != peer_kind or kind not in ("cpu", "cuda"):
        raise ValueError(f"no lockstep link between a node on {device} and one on {peer_device}")
    if kind == "cuda":
        return "ipc" if same_host else "nccl"
    return "gloo" if same_host else "ucx-lockstep"


def host_of(address: str) -> str:
    """The host part of a node's address (tcp://10.0.0.1:5555 -> 10.0.0.1)."""
    host = urlsplit(address).hostname
    if not host:
        raise ValueError(f"no host in the node address {address!r}")
    return host


@dataclass(frozen=True)
class LinkPlan:
    """The backend of every (attention node, expert node) link. Ranks as in links.py: attention node a is rank a,
    expert node e is rank attention_nodes + e."""
    attention_nodes: int
    hosts: list[str]  # by rank
    devices: list[str]  # by rank
    backends: dict[tuple[int, int], str]  # (attention node, expert node) -> backend

    def between(self, rank: int, peer: int) -> str:
        a, e = (rank, peer) if rank < self.attention_nodes else (peer, rank)
        return self.backends[(a, e - self.attention_nodes)]

    def kinds(self) -> Counter:
        """Links per backend."""
        return Counter(self.backends.values())

    def describe(self) -> str:
        """e.g. "gloo: 2 links, ucx-lockstep: 1 link"."""
        return ", ".join(f"{backend}: {n} link{'s' * (n != 1)}" for backend, n in sorted(self.kinds().items()))


def node_hosts(config: "Config") -> list[str]:
    """The host of each node by rank: cluster.*_hosts where given, else the host of its address."""
    cluster = config.cluster
    hosts = []
    for given, addresses, count, role in ((cluster.attention_hosts, cluster.attention_addresses,
                                           cluster.attention_nodes, "attention"),
                                          (cluster.expert_hosts, cluster.expert_addresses, cluster.expert_nodes,
                                           "expert")):
        if given:
            hosts += given
        elif len(addresses) == count:
            hosts += [host_of(address) for address in addresses]
        else:
            raise ValueError(f"the {role} nodes' hosts are unknown: cluster.{role}_hosts and cluster.{role}_addresses "
                             f"are not given for all {count} (the launcher fills the addresses)")
    return hosts


def plan_links(config: "Config") -> LinkPlan:
    """The cluster's links: each by choose_link under transport.backend=lockstep, else all of the one backend."""
    cluster, backend = config.cluster, config.transport.backend
    ranks = [("attention", i) for i in range(cluster.attention_nodes)] + [("expert", e)
                                                                         for e in range(cluster.expert_nodes)]
    devices = [config.node_device(role, i) for role, i in ranks]
    try:
        hosts = node_hosts(config)
    except ValueError:
        if backend == PER_LINK:
            raise
        hosts = [""] * len(ranks)  # one backend for all: the hosts only show in the handshake
    a_count = cluster.attention_nodes
    backends = {(a, e): (choose_link(hosts[a] == hosts[a_count + e], devices[a], devices[a_count + e])
                         if backend == PER_LINK else backend)
                for a in range(a_count) for e in range(cluster.expert_nodes)}
    return LinkPlan(a_count, hosts, devices, backends)


def settle_backend(config: "Config") -> str:
    """What a launcher runs for transport.backend=lockstep once every node's address is known: the one backend when
    every link takes the same (exactly that backend's path, as if named), else lockstep (a mix, m2n/mixed.py)."""
    if config.transport.backend != PER_LINK or config.cluster.expert_nodes == 0:
        return config.transport.backend
    kinds = plan_links(config).kinds()
    return next(iter(kinds)) if len(kinds) == 1 else PER_LINK


def uses_dist(config: "Config") -> bool:
    """Whether the nodes join a torch.distributed world (and need cluster.dist_address): nccl or gloo links, all
    of them or some (lockstep)."""
    backend = config.transport.backend
    if backend != PER_LINK or config.cluster.expert_nodes == 0:
        return backend in DIST_BACKENDS
    return any(link in DIST_BACKENDS for link in plan_links(config).backends.values())


def needs_eager_loading(config: "Config", role: str, index: int) -> bool:
    """Whether node `index` of `role` ("attention" or "expert") has an NCCL link. A posted NCCL receive is a kernel
    that runs until its message comes; CUDA loads a kernel lazily at its first launch, and the load may wait for
    the device to drain: so a node that loads a kernel while a receive is pending waits on its peer, which may be
    loading one of its own behind a receive from this node (seen on 2 x H200: both stuck in Triton's load). Such
    a node loads every CUDA module at start instead (CUDA_MODULE_LOADING=EAGER; Triton's at its warm-up)."""
    device = config.node_device(role, index)
    if config.transport.backend not in (PER_LINK, "nccl") or not device.startswith("cuda"):
        return False
    plan = plan_links(config)
    links = ([plan.backends[(index, e)] for e in range(config.cluster.expert_nodes)] if role == "attention" else
             [plan.backends[(a, index)] for a in range(config.cluster.attention_nodes)])
    return "nccl" in links


def data_path(config: "Config") -> str:
    """The data path as launchers report it: the backend, and a mix's links per backend."""
    if config.transport.backend == PER_LINK and config.cluster.expert_nodes:
        return f"lockstep links ({plan_links(config).describe()})"
    return config.transport.backend
