"""Replicas: the run-time choice rule, locality-aware replicas land where their users are, and the load-only
baseline copies the hottest expert."""
import numpy as np
import pytest

from expertmesh.placement.plan import Placement
from expertmesh.placement.replication import choose_replica, expected_loads, replicate, replicate_by_load
from expertmesh.placement.topology import Topology


def test_choose_replica_prefers_own_domain_then_least_loaded():
    node_domain = [0, 0, 1, 1]
    load = [5.0, 1.0, 0.0, 9.0]
    assert choose_replica([0, 1, 2], 0, node_domain, load) == 1  # both local: the lighter
    assert choose_replica([0, 3], 1, node_domain, load) == 3  # local beats lighter remote
    assert choose_replica([0, 1], 1, node_domain, load) == 1  # none local: least loaded
    assert choose_replica([2, 3], 0, node_domain, [0.0, 0.0, 2.0, 2.0]) == 2  # ties: listed first
    with pytest.raises(ValueError, match="empty"):
        choose_replica([], 0, node_domain, load)


def two_domain_setup():
    topology = Topology.uniform(2, 2, 2, slots_per_node=3)  # node 0 in domain 0, node 1 in domain 1
    primary = Placement(2, {0: [[0], [0], [1], [1]]})
    # domain 1's tokens use expert 0 a lot; domain 0's tokens use experts 0 and 1
    demand = np.array([[[40.0, 40.0, 10.0, 10.0]], [[40.0, 0.0, 30.0, 30.0]]])
    return topology, primary, demand


def test_replica_goes_to_the_domain_that_uses_the_expert():
    topology, primary, demand = two_domain_setup()
    load, crossing = expected_loads(primary.nodes_of[0], demand[:, 0], np.array([0, 1]), 2)
    assert load.tolist() == [120.0, 80.0] and crossing == 60.0  # 40 + 10 + 10 selections leave their domain
    placed = replicate(primary, topology, demand)
    assert placed.nodes_of[0][0] == [0, 1]  # expert 0 copied into domain 1
    new_load, new_crossing = expected_loads(placed.nodes_of[0], demand[:, 0], np.array([0, 1]), 2)
    assert new_crossing < crossing and new_load.max() / new_load.mean() <= topology.load_bound
    assert sum(len(n) for n in placed.nodes_of[0]) <= 2 * 3 and primary.nodes_of[0][0] == [0]  # input untouched


def test_load_only_baseline_copies_the_hottest_expert():
    topology = Topology.uniform(1, 1, 4, slots_per_node=2)
    primary = Placement(4, {0: [[0], [1], [2], [3]]})
    placed = replicate_by_load(primary, topology, np.array([[100.0, 10.0, 10.0, 10.0]]))
    copies = [len(nodes) for nodes in placed.nodes_of[0]]
    assert copies == [4, 2, 1, 1]  # 4 free slots: expert 0 reaches every node, then the first of the rest
    assert all(len(set(nodes)) == len(nodes) for nodes in placed.nodes_of[0])


def test_spill_leaves_an_overloaded_domain():
    node_domain = [0, 0, 1, 1]
    load = [5.0, 4.0, 0.0, 1.0]
    assert choose_replica([0, 1, 2], 0, node_domain, load) == 1  # locality first without a spill bound
    assert choose_replica([0, 1, 2], 0, node_domain, load, spill_above=3.0) == 2  # both local copies above it
    assert choose_replica([0, 1, 2], 0, node_domain, load, spill_above=4.5) == 1  # one local copy below it
