"""The simulator's cost model against a real multi-process cluster: the same requests, placement and
topology give the same intra- and cross-domain bytes (within 5%)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from expertmesh.bench import prometheus
from expertmesh.model.spec import ModelSpec
from expertmesh.placement.plan import Placement
from expertmesh.attention_node.profile import profile
from expertmesh.placement.simulator import CostModel, Workload, replay
from expertmesh.placement.topology import Topology

from .cluster import Cluster, wait_for

pytestmark = pytest.mark.slow
MODEL = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"
TEXTS = [
    ("python", "import os\nimport sys\n\n\ndef main(argv):\n    for name in os.listdir(argv[1]):\n"
               "        if name.endswith('.py'):\n            print(name)\n    return 0\n"),
    ("french", "Cette commande affiche la liste des fichiers du répertoire courant. Les options "
               "permettent de trier les fichiers par date ou par taille."),
    ("c", "#include <stdio.h>\n\nstatic int count_lines(FILE *f)\n{\n    int c, n = 0;\n"
          "    while ((c = getc(f)) != EOF)\n        if (c == '\\n')\n            n++;\n    return n;\n}\n"),
    ("english", "This manual page documents the command that copies files and directories. "
                "It is the reference for its options and exit status."),
]


def test_simulated_bytes_match_the_cluster(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "domain": d, "doc_id": d}) for d, t in TEXTS) + "\n")
    trace = profile(MODEL, data, tmp_path / "trace.npz", window=256, progress=None)
    spec = ModelSpec.from_dir(MODEL)
    topology = Topology.from_dict({"domains": 2, "attention_nodes": 1, "expert_nodes": 4})
    placement = Placement.contiguous(spec, 4)
    (tmp_path / "placement.json").write_text(placement.to_json())
    (tmp_path / "topology.json").write_text(json.dumps(topology.to_dict()))
    # one request per document (each shorter than the profile window): its prompt is routed exactly as profiled
    starts = np.flatnonzero(np.diff(trace.doc_index, prepend=-1))
    spans = np.stack([starts, np.append(starts[1:], trace.num_tokens)], axis=1)

    cluster = Cluster(MODEL, attention_nodes=1, expert_nodes=4,
                      extra=["--placement", str(tmp_path / "placement.json"), "--topology",
                             str(tmp_path / "topology.json"), "--dtype", "float32"]).wait_ready()
    try:
        with cluster.client() as client:
            for start, end in spans:
                response = client.post("/v1/completions", json={"prompt": trace.token_ids[start:end].tolist(),
                                                                "max_tokens": 1})  # prefill only
                assert response.status_code == 200, response.text
            # one step per request; a status counts a step when it starts, so also wait for the batch to be empty
            def fresh_metrics() -> str | None:
                text = client.get("/metrics").text
                done = (prometheus.value(text, "expertmesh_engine_steps_total", attention_node="0") == len(spans)
                        and prometheus.value(text, "expertmesh_running_sequences", attention_node="0") == 0)
                return text if done else None

            metrics = wait_for(fresh_metrics, 10, "the node's counters to cover every request")
    finally:
        cluster.stop()
    sent = prometheus.by_label(prometheus.parse(metrics), "expertmesh_link_bytes_sent_total",
                               "attention_node", "expert_node")
    measured = {"intra": 0.0, "cross": 0.0}
    for (_, node), value in sent.items():
        measured["cross" if topology.expert_domain[int(node)] != topology.attention_domain[0] else "intra"] += value

    report = replay(trace, Workload(spans, prompt_tokens=0, requests_per_wave=len(spans)),
                    np.zeros(len(spans), np.int64), placement, topology,
                    CostModel(hidden_size=spec.hidden_size, dtype_bytes=4))
    simulated = {"intra": report.intra_domain_bytes_per_token * report.tokens / 2,  # per token both ways -> one way
                 "cross": report.cross_domain_bytes_per_token * report.tokens / 2}
    assert report.tokens == trace.num_tokens
    print(f"measured {measured}, simulated {simulated}")
    for kind in ("intra", "cross"):
        assert simulated[kind] > 0
        assert abs(measured[kind] - simulated[kind]) / simulated[kind] < 0.05, (kind, measured, simulated)
