"""Topology: default contiguous domains, explicit node lists, large clusters, and errors that name the bad value."""
import pytest

from expertmesh.placement.topology import Topology, TopologyError


def test_counts_give_contiguous_domains_and_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("domains: 2\nattention_nodes: 4\nexpert_nodes: 6\nslots_per_node: 5\n")
    topology = Topology.load(tmp_path / "c.yaml")
    assert topology.attention_domain == [0, 0, 1, 1] and topology.expert_domain == [0, 0, 0, 1, 1, 1]
    assert (topology.slots(16), topology.load_bound, topology.attention_load_bound) == (5, 1.1, 1.25)
    assert topology.cost_per_byte(0, 0) == 1.0 and topology.cost_per_byte(0, 1) == 10.0
    assert Topology.from_dict(topology.to_dict()) == topology


def test_explicit_domains_and_a_large_cluster():
    topology = Topology.from_dict({"domains": 2, "attention_domain": [1, 0], "expert_domain": [0, 1, 0],
                                   "inter_cost_per_byte": 4.0})
    assert topology.expert_nodes_in(0) == [0, 2] and topology.attention_nodes_in(1) == [0]
    assert topology.slots(5) == 2  # no slots given: the busiest node's share, ceil(5 / 3)
    big = Topology.uniform(8, 64, 64, slots_per_node=3)
    assert big.attention_nodes == big.expert_nodes == 64
    assert [len(big.expert_nodes_in(d)) for d in range(8)] == [8] * 8


def test_errors_name_the_offending_value():
    with pytest.raises(TopologyError, match=r"expert node domains \[3\]"):
        Topology.from_dict({"domains": 2, "attention_nodes": 2, "expert_domain": [0, 1, 3]})
    with pytest.raises(TopologyError, match=r"domains \[1\] have no expert node"):
        Topology.from_dict({"domains": 2, "attention_nodes": 2, "expert_domain": [0, 0]})
    with pytest.raises(TopologyError, match="unknown cluster keys \\['colour'\\]"):
        Topology.from_dict({"domains": 1, "attention_nodes": 1, "expert_nodes": 1, "colour": "red"})
    with pytest.raises(TopologyError, match="slots_per_node=1 x 2 expert nodes cannot hold 3"):
        Topology.uniform(1, 1, 2, slots_per_node=1).slots(3)
