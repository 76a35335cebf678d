"""Batch prompts, echo and prompt logprobs, usage in streams (issue 15, items 2-4) through a real cluster (gateway, 2
attention nodes, 2 expert nodes over zmq): every prompt of a batch gets the choice it gets alone, in OpenAI's order;
echoed prompts carry transformers' logprobs; a stream's usage chunks add up to the whole response's usage."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from .cluster import Cluster

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0.0, "ignore_eos": True}
TEXTS = ["hello world", "def self return", "a"]


@pytest.fixture(scope="module")
def served(mixtral_dir):
    """A budget of 4 tokens a step: every prompt past it prefills in chunks, its prompt logprobs gathered across
    them (the chat template's prompt takes many)."""
    cluster = Cluster(mixtral_dir, attention_nodes=2, expert_nodes=2,
                      extra=["--max-batch-tokens", "4", "--max-num-seqs", "4"]).wait_ready()
    yield cluster, mixtral_dir
    cluster.stop()


@pytest.fixture(scope="module")
def reference(mixtral_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(mixtral_dir)


def post(client: httpx.Client, path: str, body: dict, status: int = 200) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


def events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """The stream's chunks, checked to end with [DONE]."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def prompt_logprobs(reference, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob of each prompt token after the first, the log-softmax at each position) from a full forward."""
    model, _ = reference
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logprobs


def test_a_batch_gets_one_choice_per_prompt_each_as_alone(served):
    cluster, _ = served
    with cluster.client() as client:
        alone = [post(client, "/v1/completions", {"prompt": p, "max_tokens": 5 + i, **GREEDY, "return_token_ids": True})
                 for i, p in enumerate(TEXTS)]
        ids = [a["choices"][0]["prompt_token_ids"] for a in alone]
        for prompt in (TEXTS, ids):  # texts, and token-id lists
            batch = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 6, **GREEDY,
                                                     "return_token_ids": True})
            assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
            for choice, one, prompt_ids in zip(batch["choices"], alone, ids):
                assert choice["prompt_token_ids"] == prompt_ids
                assert choice["token_ids"][:5] == one["choices"][0]["token_ids"][:5] and len(choice["token_ids"]) == 6
            assert batch["usage"] == {"prompt_tokens": sum(map(len, ids)), "completion_tokens": 18,
                                      "total_tokens": sum(map(len, ids)) + 18}
        # a list of ints is one prompt; a list of one list of ints is a batch of one
        for prompt in (ids[0], [ids[0]]):
            single = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 5, **GREEDY})
            assert [c["text"] for c in single["choices"]] == [alone[0]["choices"][0]["text"]]

        streamed = events(client, "/v1/completions", {"prompt": TEXTS, "max_tokens": 6, **GREEDY})
        assert all(len(e["choices"]) == 1 for e in streamed)
        texts = ["".join(e["choices"][0]["text"] for e in streamed if e["choices"][0]["index"] == i) for i in range(3)]
        whole = post(client, "/v1/completions", {"prompt": TEXTS, "max_tokens": 6, **GREEDY})
        assert texts == [c["text"] for c in whole["choices"]]
        finished = [e["choices"][0]["index"] for e in streamed if e["choices"][0]["finish_reason"] is not None]
        assert sorted(finished) == [0, 1, 2]

        for bad in ([], [[]], ["", "a"], [[1], "a"], [[1, 2], [10 ** 7]], ["a", 1]):
            error = post(client, "/v1/completions", {"prompt": bad, "max_tokens": 2}, status=400)["error"]
            assert error["type"] == "invalid_request_error" and error["message"], bad


def test_usage_in_streams(served):
    cluster, _ = served
    with cluster.client() as client:
        for path, body in (("/v1/completions", {"prompt": TEXTS[:2], "max_tokens": 5, **GREEDY}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 5, **GREEDY})):
            usage = post(client, path, body)["usage"]
            plain = events(client, path, body)
            assert all("usage" not in e for e in plain)
            with_usage = events(client, path, {**body, "stream_options": {"include_usage": True}})
            assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"] == usage
            assert all(e["usage"] is None and len(e["choices"]) == 1 for e in with_usage[:-1])
            continuous = events(client, path, {**body, "stream_options": {"include_usage": True,
                                                                          "continuous_usage_stats": True}})
            assert continuous[-1]["usage"] == usage
            so_far: dict[int, int] = {}
            for event in continuous[:-1]:  # each chunk: its choice's prompt and tokens so far
                index = event["choices"][0]["index"]
                assert event["usage"]["completion_tokens"] >= so_far.get(index, 0)
                so_far[index] = event["usage"]["completion_tokens"]
            assert sum(so_far.values()) == usage["completion_tokens"]
            error = post(client, path, {**body, "stream_options": {"include_usage": True}}, status=400)["error"]
            assert error["param"] == "stream_options"


def test_echo_returns_the_prompt_with_transformers_logprobs(served, reference):
    cluster, _ = served
    prompt = "the ingestion of delas"
    with cluster.client() as client:
        # lm-eval-harness' loglikelihood request: the prompt alone, its tokens' logprobs
        body = post(client, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 2,
                                                "temperature": 0.0, "return_token_ids": True})
        choice = body["choices"][0]
        ids = choice["prompt_token_ids"]
        assert choice["text"] == prompt and choice["token_ids"] == [] and choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 0
        logprobs = choice["logprobs"]
        pieces = [reference[1].decode([t]) for t in ids]
        assert logprobs["tokens"] == pieces and len(ids) > 2
        assert logprobs["text_offset"] == [sum(map(len, pieces[:i])) for i in range(len(ids))]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        expected, full = prompt_logprobs(reference, ids)
        assert (torch.tensor(logprobs["token_logprobs"][1:]) - expected).abs().max().item() < 1e-4
        for top, row in zip(logprobs["top_logprobs"][1:], full):
            best = row.topk(2)
            names = [reference[1].decode([t]) for t in best.indices.tolist()]
            if len(set(names)) == 2:  # two tokens may decode alike (a partial character): one key then
                assert list(top) == names
                assert max(abs(a - b) for a, b in zip(top.values(), best.values.tolist())) < 1e-4

        # with a completion: the prompt's tokens, then the completion's, offsets running on
        alone = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "logprobs": 0, **GREEDY})
        echoed = post(client, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 4, "logprobs": 0,
                                                  **GREEDY})["choices"][0]
        assert echoed["text"] == prompt + alone["choices"][0]["text"]
        generated = torch.tensor(echoed["logprobs"]["token_logprobs"][len(ids):])  # rows projected apart: rounding
        assert (generated - torch.tensor(alone["choices"][0]["logprobs"]["token_logprobs"])).abs().max() < 1e-4
        offsets = echoed["logprobs"]["text_offset"]
        assert offsets == [sum(map(len, echoed["logprobs"]["tokens"][:i])) for i in range(len(ids) + 4)]
        streamed = events(client, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 4, "logprobs": 0,
                                                      **GREEDY})
        assert streamed[0]["choices"][0]["text"].startswith(prompt)
        assert "".join(e["choices"][0]["text"] for e in streamed) == echoed["text"]
        assert sum((e["choices"][0]["logprobs"]["text_offset"] for e in streamed), []) == offsets

        # vLLM's prompt_logprobs: each prompt token's own logprob and rank, and the top 3, keyed by token id
        for path, extra, where in (("/v1/completions", {"prompt": ids}, lambda b: b["choices"][0]),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]},
                                    lambda b: b)):
            response = post(client, path, {**extra, "max_tokens": 2, "prompt_logprobs": 3, **GREEDY,
                                           "return_token_ids": True})
            entries = where(response)["prompt_logprobs"]
            prompt_ids = response["choices"][0]["prompt_token_ids"]
            expected, full = prompt_logprobs(reference, prompt_ids)
            assert len(entries) == len(prompt_ids) and entries[0] is None
            for token, entry, lp, row in zip(prompt_ids[1:], entries[1:], expected.tolist(), full):
                own = entry[str(token)]
                assert abs(own["logprob"] - lp) < 1e-4 and own["rank"] == int((row > row[token]).sum()) + 1
                top = row.topk(3).indices.tolist()
                assert {str(t) for t in top} <= set(entry) and len(entry) == 3 + (token not in top)
            error = post(client, path, {**extra, "prompt_logprobs": 1, "stream": True}, status=400)["error"]
            assert error["param"] == "prompt_logprobs"
        error = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 0}, status=400)["error"]
        assert error["param"] == "max_tokens"


def test_openai_client(served):
    """The official client reads batches, echoed prompts and usage chunks as OpenAI's."""
    import openai
    cluster, model_dir = served
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused")
    model = model_dir.name
    batch = client.completions.create(model=model, prompt=TEXTS, max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2] and batch.usage.completion_tokens <= 12
    tokenized = client.completions.create(model=model, prompt=[[5, 6, 7], [8, 9]], max_tokens=0, echo=True,
                                          logprobs=1, temperature=0)
    assert [len(c.logprobs.token_logprobs) for c in tokenized.choices] == [3, 2]
    assert all(c.logprobs.token_logprobs[0] is None and c.logprobs.token_logprobs[1] < 0 for c in tokenized.choices)
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    whole = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
