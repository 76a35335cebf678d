"""lm-eval-harness as a real client (issue 15, item 8): its `local-completions` model runs a loglikelihood task and a
generate_until task (tests/data/lm_eval: task YAMLs on local JSONL, loaded offline) against a cluster of the default
model, and every sample's loglikelihood, greedy flag and generation equals what lm-eval's own `hf` model gets on the
same checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .cluster import Cluster

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / "data" / "lm_eval"
MODEL = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"
RUNNER = Path(__file__).resolve().parent / "run_lm_eval.py"
TASKS = ("expertmesh_mc", "expertmesh_gen")


def start_lm_eval(out: Path, model: str, model_args: str) -> subprocess.Popen:
    """lm-eval in the tasks' directory (their data_files are relative to it), with no hub access."""
    out.mkdir()
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf_home")}
    command = [sys.executable, str(RUNNER), str(DATA), model, model_args, str(out / "evaluated.json"), *TASKS]
    with open(out / "log.txt", "w") as log:  # a file, not a pipe: nobody reads it while the cluster starts
        return subprocess.Popen(command, cwd=DATA, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, out: Path) -> tuple[dict, dict[str, dict[int, dict]]]:
    """(the aggregate results, each task's samples by doc id) of a finished lm-eval run."""
    try:
        process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, (out / "log.txt").read_text()
    evaluated = json.loads((out / "evaluated.json").read_text())
    return evaluated["results"], {task: {row["doc_id"]: row for row in evaluated["samples"][task]} for task in TASKS}


def test_lm_eval_local_completions_scores_equal_its_hf_model(tmp_path):
    # lm-eval's hf model passes max_length, and transformers lets the checkpoint's generation_config (max_new_tokens
    # 128) take precedence, ignoring the task's max_gen_toks: the reference reads the same files without that one
    reference_model = tmp_path / "expertmesh-mini"
    reference_model.mkdir()
    for path in MODEL.iterdir():
        if path.name != "generation_config.json":
            (reference_model / path.name).symlink_to(path)
    # the reference needs no server: it runs while the cluster starts
    reference = start_lm_eval(tmp_path / "hf", "hf", f"pretrained={reference_model},dtype=float32,device=cpu")
    cluster = Cluster(MODEL, attention_nodes=2, expert_nodes=2)
    try:
        cluster.wait_ready()
        # add_bos_token: what the hf model does by the tokenizer's own default (tokenizer_config.json)
        served = start_lm_eval(tmp_path / "api", "local-completions", f"model=expertmesh-mini,tokenizer={MODEL},"
                               f"base_url={cluster.url}/v1/completions,add_bos_token=True")
        served_results, served_samples = finish(served, tmp_path / "api")
        with cluster.client() as client:  # vLLM's add_special_tokens: a text prompt's BOS unless asked without
            prompt_tokens = [client.post("/v1/completions", json={"prompt": "ls -la", "max_tokens": 1,
                                                                  "add_special_tokens": specials}).json()
                             ["usage"]["prompt_tokens"] for specials in (True, False)]
        assert prompt_tokens[0] == prompt_tokens[1] + 1
    finally:
        cluster.stop()
        reference_results, reference_samples = finish(reference, tmp_path / "hf")

    lines = {task: len((DATA / f"{task.removeprefix('expertmesh_')}.jsonl").read_text().splitlines()) for task in TASKS}
    for task in TASKS:
        assert sorted(served_samples[task]) == sorted(reference_samples[task]) == list(range(lines[task]))
    greedy = 0
    for doc_id, reference_row in reference_samples["expertmesh_mc"].items():
        served_row = served_samples["expertmesh_mc"][doc_id]
        assert served_row["doc"] == reference_row["doc"]
        # per choice: [loglikelihood of the continuation, whether greedy decoding gives it]
        for (served_ll, served_greedy), (reference_ll, reference_greedy) in zip(
                served_row["filtered_resps"], reference_row["filtered_resps"], strict=True):
            assert served_ll == pytest.approx(reference_ll, abs=1e-4), (doc_id, served_row["doc"])
            assert served_greedy == reference_greedy, (doc_id, served_row["doc"])
            greedy += reference_greedy
        assert (served_row["acc"], served_row["acc_norm"]) == (reference_row["acc"], reference_row["acc_norm"])
    assert greedy >= 1  # the greedy flag is checked both ways
    for doc_id, reference_row in reference_samples["expertmesh_gen"].items():
        served_row = served_samples["expertmesh_gen"][doc_id]
        assert served_row["filtered_resps"] == reference_row["filtered_resps"], (doc_id, served_row["doc"])
        assert served_row["exact_match"] == reference_row["exact_match"]
    assert all(row["filtered_resps"][0] for row in reference_samples["expertmesh_gen"].values())

    for task, metrics in (("expertmesh_mc", ("acc,none", "acc_norm,none")), ("expertmesh_gen", ("exact_match,none",))):
        for metric in metrics:
            assert served_results[task][metric] == reference_results[task][metric], (task, metric)
    print(json.dumps({"local-completions": served_results, "hf": reference_results}))
