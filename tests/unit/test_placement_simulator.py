"""Simulator: bytes, fan-out and load on a four-token example counted by hand; the rebatch policy keeps its
bounds; place and simulate from the command line."""
import json

import numpy as np

from expertmesh.cli import main
from expertmesh.placement.plan import Placement
from expertmesh.placement.simulator import (CostModel, Workload, assign_rebatch, assign_round_robin, make_workload,
                                            replay)
from expertmesh.placement.topology import Topology
from expertmesh.placement.trace import RoutingTrace


def hand_trace(rows):
    ids = np.array(rows, np.int16)[:, None, :]
    n = len(rows)
    return RoutingTrace(np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.full(n, -1, np.int16), ids,
                        np.full(ids.shape, 0.5, np.float16), np.array([0], np.int32), ["d"], [], 4)


def test_bytes_fanout_and_load_by_hand():
    # attention node 0 in domain 0, node 1 in domain 1; expert nodes 0, 1 in domain 0, node 2 in domain 1
    topology = Topology(2, [0, 1], [0, 0, 1])
    placement = Placement(3, {0: [[0], [0], [2], [2, 1]]})  # expert 3 has a replica on node 1
    trace = hand_trace([(0, 1), (1, 3), (2, 3), (0, 3)])
    workload = Workload(np.array([[0, 3], [3, 4]]), prompt_tokens=0, requests_per_wave=2)
    report = replay(trace, workload, np.array([0, 1]), placement, topology, CostModel(hidden_size=4, dtype_bytes=2))
    # token 0 -> {n0} (both experts there); token 1 -> n0, n1 (expert 3's replica local to domain 0);
    # token 2 -> n2 (remote), n1; token 3 (attention domain 1) -> n0 (remote), n2 (local replica)
    messages, remote, both_ways = 7, 2, 2 * 4 * 2
    assert report.tokens == 4 and report.fanout == messages / 4
    assert report.cross_domain_bytes_per_token == remote * both_ways / 4
    assert report.intra_domain_bytes_per_token == (messages - remote) * both_ways / 4
    assert report.cost_per_token == ((messages - remote) * 1.0 + remote * 10.0) * both_ways / 4
    assert np.isclose(report.expert_load_max_over_mean, 3 / (7 / 3))  # nodes receive 3, 2, 2 tokens
    assert report.attention_load_max_over_mean == 3 / 2


def test_rebatch_follows_scores_within_bounds():
    topology = Topology.uniform(2, 4, 2)
    workload = Workload(np.array([[i * 10, i * 10 + 10] for i in range(8)]), prompt_tokens=2, requests_per_wave=8)
    scores = np.array([[0.0, -5.0]] * 6 + [[-5.0, 0.0]] * 2)  # six want domain 0, two domain 1
    node_of = assign_rebatch(workload, topology, scores)
    domain = np.array(topology.attention_domain)[node_of]
    # domain 0 may take at most load_bound x half of the wave's tokens: 4 requests (4.4 allowed)
    assert (domain == 0).sum() == 4 and np.all(domain[6:] == 1)
    assert np.bincount(node_of, minlength=4).max() <= 1.25 * 8 / 4
    assert assign_round_robin(workload, topology).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_place_and_simulate_commands(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = [sorted(rng.choice(8, 2, replace=False)) for _ in range(2000)]
    trace = hand_trace(rows)
    trace.num_experts, trace.doc_index = 8, np.repeat(np.arange(10, dtype=np.int32), 200)
    trace.doc_ids = [str(d) for d in range(10)]
    trace.save(tmp_path / "t.npz")
    (tmp_path / "c.json").write_text(json.dumps({"domains": 2, "attention_nodes": 2, "expert_nodes": 4,
                                                 "slots_per_node": 3}))
    args = ["--trace", str(tmp_path / "t.npz"), "--cluster", str(tmp_path / "c.json")]
    assert main(["place", *args, "--out", str(tmp_path / "p.json"), "--replicate",
                 "--predictor-out", str(tmp_path / "pred.npz"), "--tokens-per-request", "64"]) == 0
    placement = Placement.from_json((tmp_path / "p.json").read_text())
    assert placement.num_expert_nodes == 4 and all(len(set(n)) == len(n) for n in placement.nodes_of[0])
    assert sum(len(n) for n in placement.nodes_of[0]) > 8  # replicas in the free slots
    assert main(["simulate", *args, "--placement", str(tmp_path / "p.json"), "--policy", "rebatch", "--predictor",
                 str(tmp_path / "pred.npz"), "--hidden-size", "8", "--tokens-per-request", "64", "--prompt-tokens",
                 "16", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokens"] == 10 * 3 * 48 and report["fanout"] >= 1.0
    workload = make_workload(trace, Topology.uniform(2, 2, 4), 64, 16)
    assert len(workload.spans) == 30 and workload.sizes.sum() == report["tokens"]


def test_spill_balances_a_replicated_expert_sent_from_one_domain():
    topology = Topology(2, [0, 1], [0, 1])
    placement = Placement(2, {0: [[0, 1], [1]]})  # expert 0 on both nodes, expert 1 on node 1
    trace = RoutingTrace(np.arange(40, dtype=np.int32), np.zeros(40, np.int32), np.full(40, -1, np.int16),
                         np.zeros((40, 1, 1), np.int16), np.ones((40, 1, 1), np.float16), np.array([0], np.int32),
                         ["d"], [], 2)
    workload = Workload(np.array([[i * 4, i * 4 + 4] for i in range(10)]), prompt_tokens=0, requests_per_wave=1)
    senders = np.zeros(10, np.int64)  # every request from domain 0
    local = replay(trace, workload, senders, placement, topology, CostModel(hidden_size=1))
    assert local.cross_domain_bytes_per_token == 0 and local.expert_load_max_over_mean == 2.0
    spilled = replay(trace, workload, senders, placement, topology, CostModel(hidden_size=1), spill=True)
    assert spilled.expert_load_max_over_mean <= 1.1 + 1e-9 and spilled.cross_domain_bytes_per_token > 0


def test_deepseek_v3_shape_simulates_group_limited_routing(tmp_path):
    """simulate --shape deepseek_v3 without a trace: a synthetic trace of its routing (top 8 within the best 4 of 8
    groups of 32 experts, 58 MoE layers), messages of its hidden size; with its groups on 8 expert nodes (contiguous
    placement), no token reaches more than 4 nodes."""
    from expertmesh.model.shapes import shape
    from expertmesh.placement.synthetic import synthetic_trace
    _, spec = shape("deepseek_v3")
    trace = synthetic_trace(spec, "DeepSeek-V3", num_docs=2, tokens_per_doc=64)
    assert trace.expert_ids.shape == (128, 58, 8) and trace.num_experts == 256
    rows = trace.expert_ids.reshape(-1, 8).tolist()
    assert max(len({e // 32 for e in row}) for row in rows) <= 4 and all(len(set(row)) == 8 for row in rows)
    (tmp_path / "c.json").write_text(json.dumps({"domains": 2, "attention_nodes": 2, "expert_nodes": 8}))
    assert main(["simulate", "--shape", "deepseek_v3", "--synthetic-docs", "2", "--cluster", str(tmp_path / "c.json"),
                 "--tokens-per-request", "128", "--prompt-tokens", "16", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokens"] == 2 * 2 * 112 and 1.0 < report["fanout"] <= 4.0  # documents of 256 tokens
    bytes_per_token = report["cross_domain_bytes_per_token"] + report["intra_domain_bytes_per_token"]
    assert bytes_per_token == report["fanout"] * 58 * 2 * 7168 * 2  # each message both ways, bf16
