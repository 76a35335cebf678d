"""Routing traces: the profiler records exactly the router's choices; the statistics are right on
traces whose answers are known."""
import json

import numpy as np
import pytest
import torch

from expertmesh.cli import main
from expertmesh.attention_node.profile import profile
from expertmesh.placement.routing_stats import mutual_information_bits, report, selection_counts
from expertmesh.placement.trace import RoutingTrace


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [{"text": "def self return the " * 30, "domain": "code", "doc_id": "a"},
            {"text": "la de la de ingestion " * 25, "domain": "prose", "doc_id": "b"},
            {"text": "on an er es st", "domain": "prose", "doc_id": "c"}]
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return path


def test_trace_records_the_routers_top_k(mixtral_dir, corpus, tmp_path):
    trace = profile(mixtral_dir, corpus, tmp_path / "t.npz", window=64, batch_windows=3, progress=None)
    loaded = RoutingTrace.load(tmp_path / "t.npz")
    assert np.array_equal(loaded.expert_ids, trace.expert_ids) and loaded.domains == ["code", "prose"]
    assert trace.expert_ids.shape == (trace.num_tokens, 4, 2) and loaded.doc_ids == ["a", "b", "c"]
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32).eval()
    first = trace.token_ids[:64]  # the first window of document a
    with torch.no_grad():
        router_logits = ref(torch.tensor([first.tolist()]), output_router_logits=True).router_logits
    for layer, logits in enumerate(router_logits):
        expected = torch.topk(logits.reshape(64, -1), 2, dim=-1).indices.sort(dim=-1).values
        got = torch.from_numpy(trace.expert_ids[:64, layer].astype(np.int64)).sort(dim=-1).values
        assert torch.equal(got, expected), f"layer {layer}"


def synthetic(domain_index, expert_ids, num_experts=4):
    n, k = expert_ids.shape
    return RoutingTrace(np.zeros(n, np.int32), np.zeros(n, np.int32), np.array(domain_index, np.int16),
                        np.array(expert_ids, np.int16)[:, None, :], np.full((n, 1, k), 1.0 / k, np.float16),
                        np.array([0], np.int32), ["d"], ["x", "y"], num_experts)


def test_mutual_information_and_concentration_on_known_traces():
    # domain x always picks experts {0,1}, domain y {2,3}: MI = H(domain) = 1 bit, top-2 share = 1
    determined = synthetic([0, 1] * 50, np.array([[0, 1], [2, 3]] * 50))
    assert mutual_information_bits(selection_counts(determined))[0] == pytest.approx(1.0)
    stats = report(determined)
    assert stats["top4_share"][0] == [1.0, 1.0] and stats["load_max_over_mean_per_layer"][0] == 1.0
    # both domains pick the same experts: MI = 0
    independent = synthetic([0, 1] * 50, np.array([[0, 1]] * 100))
    assert mutual_information_bits(selection_counts(independent))[0] == pytest.approx(0.0, abs=1e-12)


def test_profile_command_with_plot(mixtral_dir, corpus, tmp_path, capsys):
    out = tmp_path / "trace.npz"
    assert main(["profile", "--model", str(mixtral_dir), "--data", str(corpus), "--out", str(out), "--plot",
                 "--report", str(tmp_path / "r.json"), "--window", "64"]) == 0
    assert (tmp_path / "trace.png").stat().st_size > 1000
    assert "I(domain;expert)" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "r.json").read_text())["mutual_information_bits"]) == 4
