"""vLLM's sampling parameters through the whole path (HTTP gateway -> attention node, colocated experts): each changes
the output as it should, n and best_of return their choices, and what the server cannot honour is a 400.
(tests/unit/test_sampling_params.py holds each parameter against an independent computation.)"""
from __future__ import annotations

import json

import httpx
import pytest

from .cluster import Cluster

pytestmark = pytest.mark.slow

PROMPT = "the ingestion of delas"


@pytest.fixture(scope="module")
def cluster(mixtral_dir):
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=0).wait_ready()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def eos_id(mixtral_dir) -> int:
    return json.loads((mixtral_dir / "config.json").read_text())["eos_token_id"]


def complete(client: httpx.Client, **fields) -> dict:
    response = client.post("/v1/completions", json={"prompt": PROMPT, "return_token_ids": True, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def choice(client: httpx.Client, **fields) -> dict:
    return complete(client, **fields)["choices"][0]


def test_logit_bias_stop_token_ids_and_min_tokens_change_the_output(cluster, eos_id):
    with cluster.client() as client:
        greedy = choice(client, max_tokens=8, temperature=0.0, ignore_eos=True)["token_ids"]
        forced = next(t for t in range(2, 100) if t not in greedy)
        biased = choice(client, max_tokens=5, temperature=0.8, seed=1, ignore_eos=True, logit_bias={str(forced): 100})
        assert biased["token_ids"] == [forced] * 5
        # the first token not seen before it, as a stop token: generation ends on it, its text left out (vLLM)
        at = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
        stopped = choice(client, max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[greedy[at]])
        assert (stopped["token_ids"], stopped["finish_reason"]) == (greedy[:at + 1], "stop")
        assert stopped["text"] == choice(client, max_tokens=at, temperature=0.0, ignore_eos=True)["text"]
        # EOS forced at once ends with one token; min_tokens holds it (and the stop token) off for 3
        eos_now = choice(client, max_tokens=8, temperature=0.0, logit_bias={str(eos_id): 100})
        assert (eos_now["token_ids"], eos_now["finish_reason"], eos_now["text"]) == ([eos_id], "stop", "")
        held = choice(client, max_tokens=8, temperature=0.0, logit_bias={str(eos_id): 100}, min_tokens=3,
                      stop_token_ids=[greedy[0]])
        assert held["finish_reason"] == "stop" and len(held["token_ids"]) == 4 and held["token_ids"][3] == eos_id
        assert eos_id not in held["token_ids"][:3] and greedy[0] not in held["token_ids"][:3]
        # a penalty changes what greedy picks on a repetitive prompt
        repeated = {"prompt": "la la la la la la", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        assert choice(client, **repeated)["token_ids"] != choice(client, **repeated, frequency_penalty=2.0)["token_ids"]


def test_n_choices_are_the_seeded_samples_and_usage_counts_the_prompt_once(cluster):
    with cluster.client() as client:
        sampled = {"max_tokens": 6, "temperature": 1.0, "ignore_eos": True}
        body = complete(client, n=3, seed=5, **sampled)
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        alone = [choice(client, seed=5 + i, **sampled) for i in range(3)]  # sample i draws with seed + i (vLLM)
        assert [c["token_ids"] for c in body["choices"]] == [c["token_ids"] for c in alone]
        assert len({tuple(c["token_ids"]) for c in alone}) > 1
        prompt_tokens = len(alone[0]["prompt_token_ids"])
        assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 18, "total_tokens": prompt_tokens + 18}
        # best_of: the one of highest cumulative logprob among the same three samples
        best = complete(client, n=1, best_of=3, seed=5, **sampled)
        scored = [choice(client, seed=5 + i, logprobs=0, **sampled) for i in range(3)]
        winner = max(scored, key=lambda c: sum(c["logprobs"]["token_logprobs"]))
        assert [c["token_ids"] for c in best["choices"]] == [winner["token_ids"]]
        assert best["choices"][0]["logprobs"] is None  # not asked for


def test_n_streams_as_indexed_chunks(cluster):
    with cluster.client() as client:
        chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 1.0, "n": 2,
                "seed": 9, "ignore_eos": True}
        whole = client.post("/v1/chat/completions", json=chat).json()
        texts, roles = {0: "", 1: ""}, {0: 0, 1: 0}
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    (c,) = json.loads(line[6:])["choices"]
                    texts[c["index"]] += c["delta"]["content"]
                    roles[c["index"]] += "role" in c["delta"]
    assert texts == {c["index"]: c["message"]["content"] for c in whole["choices"]}
    assert roles == {0: 1, 1: 1}  # each choice's first chunk carries the role


def test_openai_client_n_and_an_unsupported_parameter(cluster):
    import openai
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, n=2, seed=3, temperature=1.0,
                                           extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert [c.index for c in completion.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, suffix="}")
