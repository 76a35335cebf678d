"""Semantic scheduling end to end: `profile` -> `place` (co-activation placement, replicas, predictor) ->
a real cluster in 2 domains that rebatches requests by predicted domain and picks replicas by locality;
generated tokens are identical to the plain cluster's (transformers' greedy ones, which every mode gives)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from expertmesh.bench import prometheus
from expertmesh.cli import main as cli
from expertmesh.placement.plan import Placement

from .cluster import Cluster
from .test_simulator_agreement import MODEL, TEXTS

pytestmark = pytest.mark.slow
PROMPTS = ["import os\n\ndef", "Cette commande permet de", "#include <stdio.h>\n\nint", "This manual page",
           "def main(argv):\n    for", "Les options permettent"]


def generate(cluster: Cluster) -> tuple[list[list[int]], str]:
    with cluster.client() as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        bodies = list(pool.map(lambda p: client.post("/v1/completions", json={
            "prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "return_token_ids": True}).json(),
            PROMPTS))
        return [b["choices"][0]["token_ids"] for b in bodies], client.get("/metrics").text


def greedy_reference(max_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens of each prompt, float32, the prompt tokenized as the gateway does (with BOS)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    outputs = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            generated = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            outputs.append(generated[0, ids.shape[1]:].tolist())
    return outputs


def test_placement_replicas_and_rebatching_keep_tokens_identical(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t * 3, "domain": d, "doc_id": d}) for d, t in TEXTS) + "\n")
    (tmp_path / "cluster.json").write_text(json.dumps(
        {"domains": 2, "attention_nodes": 2, "expert_nodes": 4, "slots_per_node": 5}))
    assert cli(["profile", "--model", str(MODEL), "--data", str(data), "--out", str(tmp_path / "t.npz")]) == 0
    assert cli(["place", "--trace", str(tmp_path / "t.npz"), "--cluster", str(tmp_path / "cluster.json"),
                "--out", str(tmp_path / "placement.json"), "--replicate",
                "--predictor-out", str(tmp_path / "predictor.npz")]) == 0
    placement = Placement.from_json((tmp_path / "placement.json").read_text())
    assert any(len(nodes) > 1 for experts in placement.nodes_of.values() for nodes in experts)  # replicas exist

    semantic = Cluster(MODEL, attention_nodes=2, expert_nodes=4, extra=[
        "--dtype", "float32", "--placement", str(tmp_path / "placement.json"),
        "--topology", str(tmp_path / "cluster.json"), "--predictor", str(tmp_path / "predictor.npz")]).wait_ready()
    try:
        semantic_tokens, metrics = generate(semantic)
    finally:
        semantic.stop()

    assert semantic_tokens == greedy_reference(16)  # what the plain cluster gives (exact against transformers)
    decisions = prometheus.by_label(prometheus.parse(metrics), "expertmesh_routing_decisions_total", "decision")
    assert sum(decisions[(d,)] for d in ("predicted", "next_domain", "overflow")) == len(PROMPTS)
    assert decisions[("predicted",)] > 0
