"""Starts a whole cluster across the hosts of a Ray cluster: every attention and expert node as a Ray actor placed by
one placement group (a bundle per node, its role's GPU type as a resource), the gateway on this host as the HTTP entry.

Each actor runs its node as a process on its host, as launcher/local.py does here: it reserves the node's ports on
its host's address and reports them, and the launcher writes every address into the config all nodes read. The
supervision is launcher/supervision.py's: a node that dies is restarted by its actor on its host, an actor that
dies on a live host is replaced there, and a lost host stops the cluster, since every peer knows its nodes by an
address on that host."""
from __future__ import annotations

import dataclasses
import functools
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..m2n.link_plan import DIST_BACKENDS, PER_LINK, data_path, plan_links, settle_backend
from ..transport.base import resolve_backend
from . import ClusterError, supervision
from .local import Child
from .node_host import NodeHost, die_with_parent, reap

PLACEMENT_TIMEOUT_S = 60.0  # for Ray to find every bundle a host, after the resources were checked to exist
CALL_TIMEOUT_S = 60.0  # for an actor to answer: past it, its host is taken as lost
UNREACHABLE_S = 30.0  # an actor Ray calls unavailable (a network blip, or a host going) is lost after this long
ACTOR_DIED = -1  # the exit code reported for a node whose actor died (its process died with it: PR_SET_PDEATHSIG)
ROLES = (("expert", "expertmesh.expert_node"), ("attention", "expertmesh.attention_node"))


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs the ray package, which is not installed here: "
                           "pip install 'expertmesh[ray]' (on every host of the Ray cluster too)") from None
    return ray


@dataclass
class RayNode:
    """A node as the launcher supervises it (supervision.Supervised): its actor, where Ray put it, its pid."""
    name: str  # e.g. "expert node 1"
    actor: Any  # the NodeHost actor's handle
    host: str  # the address of its host, which it binds
    ray_node_id: str
    pid: int = 0
    deaths: list[float] = dataclasses.field(default_factory=list)
    restart_at: float | None = None
    unreachable_since: float | None = None  # monotonic time its actor was first found unavailable, lately
    new_actor: Callable[[], Any] | None = None  # a NodeHost actor in the same bundle, so on the same host
    start_args: tuple = ()  # NodeHost.start's: (config, module, index)
    actor_died: bool = False  # on a host still alive: restart() puts a new actor there

    def call(self, method: str, *args: Any) -> Any:
        """The actor's `method` run on its host; ClusterError when the actor (its host, or Ray there) is lost."""
        import ray
        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            raise self.lost(exc) from None

    def lost(self, exc: Exception) -> ClusterError:
        # Ray's own words say why (a dead host, or e.g. expertmesh not importable there), cut to a line
        reason = " ".join(str(exc).split())
        return ClusterError(f"{self.name}'s host {self.host} (Ray node {self.ray_node_id}) is lost, or Ray there: "
                            f"its actor is gone ({type(exc).__name__}: {reason[:400]})")

    def exit_code(self) -> int | None:
        """None while it runs, and while Ray calls its actor unavailable for less than UNREACHABLE_S (a network
        blip between hosts; Ray says ActorDiedError once it knows the actor is gone); ACTOR_DIED when its actor died
        on a host still alive; ClusterError once its host is lost."""
        import ray
        if self.actor_died:
            return ACTOR_DIED
        try:
            code = ray.get(self.actor.exit_code.remote(), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.ActorDiedError as exc:
            if self.new_actor is None or not self.host_alive():
                raise self.lost(exc) from None
            self.actor_died = True
            return ACTOR_DIED
        except ray.exceptions.ActorUnavailableError as exc:
            self.unreachable_since = self.unreachable_since or time.monotonic()
            if time.monotonic() - self.unreachable_since < UNREACHABLE_S:
                return None
            raise self.lost(exc) from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            raise self.lost(exc) from None
        self.unreachable_since = None
        return code

    def host_alive(self) -> bool:
        import ray
        return any(node["NodeID"] == self.ray_node_id and node.get("Alive") for node in ray.nodes())

    def where(self) -> str:
        return f"pid {self.pid} on {self.host}" + ("; its Ray actor died" if self.actor_died else "")

    def kill(self) -> None:
        if not self.actor_died:
            self.call("kill")

    def restart(self) -> None:
        if not self.actor_died:
            self.pid = self.call("restart")
            return
        self.actor = self.new_actor()
        host, ray_node_id, _ = self.call("reserve", 0)
        if ray_node_id != self.ray_node_id:  # Ray moved the bundle: every peer knows the node at its old host
            raise ClusterError(f"{self.name}'s new Ray actor is on another host ({host}, Ray node {ray_node_id}), "
                               f"not {self.host} (Ray node {self.ray_node_id}) where its peers reach it")
        self.actor_died = False
        self.pid = self.call("start", *self.start_args)


class RayCluster:
    def __init__(self, config: Config, address: str) -> None:
        self.config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster),
                                          transport=dataclasses.replace(config.transport),
                                          model=dataclasses.replace(config.model))
        self.address = address
        self.run_dir = Path(tempfile.mkdtemp(prefix="expertmesh-"))
        self.nodes: list[RayNode] = []
        self.gateway: Child | None = None
        self.placement_group: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.config.gateway.host}:{self.config.gateway.port}"

    def summary(self) -> str:
        cluster = self.config.cluster
        return (f"{cluster.attention_nodes} attention and {cluster.expert_nodes} expert nodes on the Ray cluster at "
                f"{self.address} serving {self.config.model.path}, data path {data_path(self.config)}")

    def start(self) -> None:
        ray = import_ray()
        config, cluster = self.config, self.config.cluster
        self.check_config()
        self.check_reachable()
        try:
            ray.init(address=self.address, namespace="expertmesh", log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot reach the Ray cluster at {self.address!r}: {exc}") from None
        roles = [(role, module, index) for role, module in ROLES
                 for index in range(cluster.expert_nodes if role == "expert" else cluster.attention_nodes)]
        hosts = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        bundles = [self.bundle(role, hosts) for role, _, _ in roles]
        self.check_resources(ray, roles, bundles, hosts)
        self.place(ray, roles, bundles)
        # Ports: an expert node's data and control ports; an attention node's control port, and attention node 0
        # (rank 0 of the nccl/gloo world) the rendezvous port (lockstep: in case some links take nccl or gloo).
        dist = config.transport.backend in (*DIST_BACKENDS, PER_LINK)
        wants = [2 if role == "expert" else 1 + (dist and index == 0) for role, _, index in roles]
        reserved = [node.call("reserve", want) for node, want in zip(self.nodes, wants)]
        for node, (host, ray_node_id, _) in zip(self.nodes, reserved):
            node.host, node.ray_node_id = host, ray_node_id
        scheme = "ucx" if config.transport.backend == "ucx" else "tcp"
        for (role, _, index), (host, _, ports) in zip(roles, reserved):
            if role == "expert":
                cluster.expert_addresses.append(f"{scheme}://{host}:{ports[0]}")
                cluster.expert_control_addresses.append(f"tcp://{host}:{ports[1]}")
            else:
                cluster.attention_addresses.append(f"tcp://{host}:{ports[0]}")
                if len(ports) > 1:
                    cluster.dist_address = f"tcp://{host}:{ports[1]}"
        config.transport.backend = settle_backend(config)  # lockstep: one backend, or a mix, now the hosts are known
        if cluster.expert_nodes and "ipc" in plan_links(config).kinds():
            raise ClusterError(f"transport.backend=lockstep would link nodes of one host by ipc ({data_path(config)}), "
                               f"but Ray shows each node its own GPU only, where CUDA IPC cannot open a peer's "
                               f"memory: use nccl")
        if cluster.secret is None:
            cluster.secret = secrets.token_hex(16)
        config_dict = config.validate().to_dict()
        for node, (_, module, index) in zip(self.nodes, roles):
            node.start_args = (config_dict, module, index)
            node.pid = node.call("start", *node.start_args)
            print(f"expertmesh: {node.name}: {node.where()} (Ray node {node.ray_node_id})", flush=True)
        config_path = self.run_dir / "cluster.json"
        config_path.touch(mode=0o600)  # it holds the cluster's secret
        config.save(config_path)
        command = [sys.executable, "-m", "expertmesh.gateway", "--config", str(config_path), "--index", "0"]
        self.gateway = Child("gateway", subprocess.Popen(command, preexec_fn=die_with_parent), command)

    def check_config(self) -> None:
        """What cannot work across hosts, said before anything starts; paths made absolute (the same on every host)."""
        config, cluster = self.config, self.config.cluster
        if config.gateway.workers > 1:
            raise ClusterError(f"gateway.workers={config.gateway.workers}: several gateway processes run with the "
                               f"local launcher only so far; on Ray the gateway is one process")
        if config.transport.backend == "auto" and config.model.device == "cuda":
            # not lockstep's ipc within a host: Ray shows each node its own GPU only, and CUDA IPC cannot open a
            # peer's memory on a GPU it does not see
            config.transport.backend = "nccl"
        config.transport.backend = resolve_backend(config.transport.backend, config.model.device)
        if config.transport.backend == "ipc":
            raise ClusterError("transport.backend=ipc links the GPUs of one host; across the hosts of a Ray cluster "
                               "use nccl (or ucx)")
        given = [name for name in ("attention_addresses", "expert_addresses", "expert_control_addresses",
                                   "dist_address", "attention_hosts", "expert_hosts") if getattr(cluster, name)]
        if given:
            raise ClusterError(f"cluster.{', cluster.'.join(given)} given: with a Ray cluster the launcher takes "
                               f"every node's address from the host Ray places it on; remove them")
        unknown = set(cluster.ray_resources) - {"attention", "expert"}
        if unknown:
            raise ClusterError(f"cluster.ray_resources names roles {sorted(unknown)}; roles: attention, expert")
        if config.model.device == "cuda":  # Ray shows each node's actor its own GPU only, as cuda:0
            cluster.attention_gpus, cluster.expert_gpus = [0] * cluster.attention_nodes, [0] * cluster.expert_nodes
        for section, key in (("model", "path"), ("cluster", "placement"), ("cluster", "topology")):
            value = getattr(getattr(config, section), key)
            if value and Path(value).exists():  # nodes run in Ray's working directories, not this one
                setattr(getattr(config, section), key, str(Path(value).resolve()))

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """ClusterError at once when the head at host:port does not answer: ray.init would retry for minutes."""
        if self.address == "auto":  # Ray finds the cluster of this host, or says there is none
            return
        host, _, port = self.address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise ClusterError(f"--ray {self.address!r}: give the head's host:port (e.g. 10.0.0.1:6379) or auto")
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
        except OSError as exc:
            raise ClusterError(f"cannot reach the Ray cluster at {self.address}: {exc} (is `ray start --head` "
                               f"running there?)") from None

    def bundle(self, role: str, hosts: list[dict[str, float]]) -> dict[str, float]:
        """What one node of `role` reserves on its host: its cores, its GPU and that GPU's type."""
        bundle = {"CPU": float(self.config.model.torch_threads)}
        if self.config.model.device == "cuda":
            bundle["GPU"] = 1.0
        bundle.update({key: float(amount) for key, amount in self.config.cluster.ray_resources.get(role, {}).items()})
        cluster = self.config.cluster
        gpu_type = cluster.attention_gpu_type if role == "attention" else cluster.expert_gpu_type
        if gpu_type:
            # Ray's own accelerator_type:T (1 on each host that has T; a node asks 0.001 of it, as Ray's
            # accelerator_type option does), else a custom resource T that counts a host's GPUs of that type.
            # Spelled as the cluster spells it (Ray's "H200" from "NVIDIA H200"; the plan may say "h200").
            spelled = {key.lower(): key for host in hosts for key in host}
            key = f"accelerator_type:{gpu_type}"
            if key.lower() in spelled:
                bundle[spelled[key.lower()]] = 0.001
            elif gpu_type.lower() in spelled:
                bundle[spelled[gpu_type.lower()]] = 1.0
            else:
                offered = sorted({k for host in hosts for k in host if k not in ("CPU", "GPU", "memory",
                                  "object_store_memory") and not k.startswith("node:")})
                raise ClusterError(f"no host of the Ray cluster at {self.address} offers GPU type {gpu_type!r} for "
                                   f"the {role} nodes (neither Ray's {key} nor a custom resource {gpu_type!r}); "
                                   f"its hosts offer {offered}")
        return bundle

    def check_resources(self, ray: Any, roles: list[tuple[str, str, int]], bundles: list[dict[str, float]],
                        hosts: list[dict[str, float]]) -> None:
        """ClusterError naming the resource when the Ray cluster cannot hold the nodes, rather than a placement
        that waits for ever."""
        for (role, _, index), bundle in zip(roles, bundles):
            if not any(all(host.get(key, 0.0) >= amount for key, amount in bundle.items()) for host in hosts):
                missing = [key for key, amount in bundle.items()
                           if not any(host.get(key, 0.0) >= amount for host in hosts)]
                raise ClusterError(f"no host of the Ray cluster at {self.address} can hold {role} node {index}: "
                                   f"it needs {bundle}, and {missing or 'these together'} no host has "
                                   f"({len(hosts)} hosts)")
        total = ray.cluster_resources()
        for key in sorted({key for bundle in bundles for key in bundle}):
            needed = sum(bundle.get(key, 0.0) for bundle in bundles)
            if needed > total.get(key, 0.0) + 1e-9:
                users = sorted({role for (role, _, _), bundle in zip(roles, bundles) if key in bundle})
                raise ClusterError(f"not enough {key} in the Ray cluster at {self.address}: the "
                                   f"{' and '.join(users)} nodes need {needed:g}, it has {total.get(key, 0.0):g}")

    def place(self, ray: Any, roles: list[tuple[str, str, int]], bundles: list[dict[str, float]]) -> None:
        """One placement group, a bundle a node; one NodeHost actor in each bundle."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        self.placement_group = placement_group(bundles, strategy="PACK", name=f"expertmesh-{self.run_dir.name}")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            free = ray.available_resources()
            raise ClusterError(f"Ray placed no host for all {len(bundles)} nodes within {PLACEMENT_TIMEOUT_S:.0f} s "
                               f"(other work holds resources?): they need {bundles}; free now: {free}")
        actor_class = ray.remote(NodeHost)

        def new_actor(bundle_index: int, bundle: dict[str, float], name: str) -> Any:
            custom = {key: amount for key, amount in bundle.items() if key not in ("CPU", "GPU")}
            return actor_class.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0.0), resources=custom,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, bundle_index)
            ).remote(name)

        for bundle_index, ((role, _, index), bundle) in enumerate(zip(roles, bundles)):
            name = f"{role} node {index}"
            self.nodes.append(RayNode(name, new_actor(bundle_index, bundle, name), host="?", ray_node_id="?",
                                      new_actor=functools.partial(new_actor, bundle_index, bundle, name)))

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        supervision.wait_healthy(self.url, [*self.nodes, self.gateway], timeout_s)

    def supervise(self) -> None:
        supervision.supervise([*self.nodes, self.gateway], self.config)

    def stop(self, grace_s: float = 10.0) -> None:
        """The gateway first (it would report the nodes' stopping as failures), then every node, its actor and
        the placement group."""
        if self.gateway is not None and self.gateway.process.poll() is None:
            self.gateway.process.terminate()
            reap(self.gateway.process, self.gateway.name, grace_s, grace_s)
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        stopping = [node.actor.stop.remote(grace_s) for node in self.nodes]
        ray.wait(stopping, num_returns=len(stopping), timeout=grace_s + 5)  # a lost host's actor answers nothing
        for node in self.nodes:
            ray.kill(node.actor)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.placement_group)
        ray.shutdown()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def launch(config: Config, ready_timeout_s: float = 300.0) -> int:
    """`expertmesh launch --ray ADDRESS`: the cluster on Ray until signalled (exit 0) or a node dies beyond what
    supervision mends (exit 1)."""
    return supervision.run(RayCluster(config, config.cluster.ray_address), ready_timeout_s)
