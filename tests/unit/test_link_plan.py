"""The per-link choice of transport.backend=lockstep (m2n/link_plan.py): the rule of locality and device, the plan
every node computes from the config, what the launchers run for it, and the handshake's check that both ends of a
link chose alike."""
from __future__ import annotations

import pytest

from expertmesh.config import Config, ConfigError
from expertmesh.m2n.handshake import check_link, link_facts
from expertmesh.m2n.link_plan import (choose_link, data_path, host_of, needs_eager_loading, plan_links,
                                      settle_backend, uses_dist)
from expertmesh.transport.base import resolve_backend


@pytest.mark.parametrize("same_host, device, peer_device, expected", [
    (True, "cuda:0", "cuda:1", "ipc"),  # CUDA IPC between the GPUs of one host (or within one GPU)
    (True, "cuda:0", "cuda:0", "ipc"),
    (False, "cuda:0", "cuda:0", "nccl"),  # IPC cannot reach another host
    (True, "cpu", "cpu", "gloo"),
    (False, "cpu", "cpu", "ucx-lockstep"),  # RDMA where the hosts have it
])
def test_the_rule_by_locality_and_device(same_host, device, peer_device, expected):
    assert choose_link(same_host, device, peer_device) == expected


def test_no_link_between_a_cpu_and_a_gpu_node():
    with pytest.raises(ValueError, match="between a node on cpu and one on cuda:0"):
        choose_link(True, "cpu", "cuda:0")


def cluster_config(backend: str = "lockstep", device: str = "cpu", attention_hosts=(), expert_hosts=(),
                   attention_addresses=("tcp://127.0.0.1:1",), expert_addresses=("tcp://127.0.0.1:2",
                                                                                 "tcp://127.0.0.1:3")) -> Config:
    config = Config()
    config.model.device, config.transport.backend = device, backend
    c = config.cluster
    c.attention_nodes, c.expert_nodes = len(attention_addresses), len(expert_addresses)
    c.attention_addresses, c.expert_addresses = list(attention_addresses), list(expert_addresses)
    c.attention_hosts, c.expert_hosts = list(attention_hosts), list(expert_hosts)
    if device == "cuda":
        c.attention_gpus, c.expert_gpus = list(range(c.attention_nodes)), list(range(c.expert_nodes))
    return config.validate()


def test_hosts_come_from_the_addresses_unless_given():
    assert host_of("tcp://10.0.0.7:5555") == "10.0.0.7" and host_of("ucx://[::1]:5555") == "::1"
    config = cluster_config(attention_addresses=["tcp://10.0.0.1:1", "tcp://10.0.0.2:1"],
                            expert_addresses=["tcp://10.0.0.1:2", "tcp://10.0.0.2:2"])
    plan = plan_links(config)
    assert plan.hosts == ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"]
    assert plan.backends == {(0, 0): "gloo", (0, 1): "ucx-lockstep", (1, 0): "ucx-lockstep", (1, 1): "gloo"}
    assert plan.between(0, 3) == plan.between(3, 0) == "ucx-lockstep"  # ranks: attention 0-1, expert 2-3
    # given hosts override the addresses (one machine standing for two hosts)
    plan = plan_links(cluster_config(attention_hosts=["a"], expert_hosts=["a", "b"]))
    assert plan.backends == {(0, 0): "gloo", (0, 1): "ucx-lockstep"}
    assert plan.describe() == "gloo: 1 link, ucx-lockstep: 1 link"


def test_gpus_mix_ipc_within_a_host_and_nccl_across():
    plan = plan_links(cluster_config(device="cuda", attention_hosts=["a"], expert_hosts=["a", "b"]))
    assert plan.backends == {(0, 0): "ipc", (0, 1): "nccl"}
    assert plan.devices == ["cuda:0", "cuda:0", "cuda:1"]


def test_nodes_with_an_nccl_link_load_every_kernel_at_start():
    mixed = cluster_config(device="cuda", attention_hosts=["a"], expert_hosts=["a", "b"])  # ipc to 0, nccl to 1
    assert [needs_eager_loading(mixed, "expert", e) for e in (0, 1)] == [False, True]
    assert needs_eager_loading(mixed, "attention", 0)  # it has the nccl link to expert node 1
    assert needs_eager_loading(cluster_config(backend="nccl", device="cuda"), "expert", 0)
    assert not needs_eager_loading(cluster_config(backend="ipc", device="cuda"), "attention", 0)
    assert not needs_eager_loading(cluster_config(expert_hosts=["a", "b"], attention_hosts=["b"]), "expert", 0)


def test_a_named_backend_takes_every_link():
    plan = plan_links(cluster_config(backend="gloo", attention_hosts=["a"], expert_hosts=["a", "b"]))
    assert set(plan.backends.values()) == {"gloo"}


def test_what_launchers_run_for_lockstep():
    # one host: every link the same, so exactly that backend's path, as if named
    assert resolve_backend("auto", "cuda") == "lockstep"
    one_host = cluster_config(device="cuda")
    assert settle_backend(one_host) == "ipc" and not uses_dist(one_host)
    assert settle_backend(cluster_config()) == "gloo"
    # two hosts: a mix, with a torch.distributed world for the gloo links
    mixed = cluster_config(attention_hosts=["a"], expert_hosts=["a", "b"])
    assert settle_backend(mixed) == "lockstep" and uses_dist(mixed)
    assert data_path(mixed) == "lockstep links (gloo: 1 link, ucx-lockstep: 1 link)"
    across = cluster_config(attention_hosts=["a"], expert_hosts=["b", "c"])
    assert settle_backend(across) == "ucx-lockstep" and not uses_dist(across)


def test_hosts_must_name_every_node():
    with pytest.raises(ConfigError, match=r"names 1 hosts for 2 expert nodes"):
        cluster_config(expert_hosts=["a"])
    config = cluster_config()
    config.cluster.expert_addresses = []
    with pytest.raises(ValueError, match="the expert nodes' hosts are unknown"):
        plan_links(config)


def test_the_handshake_refuses_a_link_its_ends_chose_differently():
    class Links:  # what check_link reads of a node's links
        plan = plan_links(cluster_config(attention_hosts=["a"], expert_hosts=["a", "b"]))
    assert link_facts(Links, 0, 2) == ("a", "cpu", "ucx-lockstep")
    check_link(Links, 2, 0, "attention node 0", "a", "cpu", "ucx-lockstep")  # agreed
    with pytest.raises(ValueError, match="it chose gloo, this node ucx-lockstep"):
        check_link(Links, 2, 0, "attention node 0", "b", "cpu", "gloo")
