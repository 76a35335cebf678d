"""The whole path through real processes: HTTP gateway, 2 attention nodes, 3 expert nodes over zmq, or over the
lockstep M2N on gloo with 2 microbatches (or none: colocated; DeepSeek-V3 also over UCX links), checked token for token (and logprob for logprob)
against transformers."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from expertmesh.bench import prometheus

from .cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

PROMPTS = ["hello world", "def self return", "the ingestion of delas", "a", "stst on on on an er",
           "return the self of the def", "ing ion es", "la la la la la la la la la la la la la"]


@pytest.fixture(scope="module", params=["mixtral", "qwen3", "mixtral-colocated", "qwen3-lockstep-gloo-async"])
def served(request, mixtral_dir, qwen3_dir):
    """Disaggregated (3 expert nodes) for both architectures; colocated (--expert-nodes 0: experts inside each
    attention node, no transport) for one; the lockstep M2N with async scheduling (each step launched while the
    previous one runs) for one, with a budget of 8 tokens a step (the M2N buffers hold 8 tokens, and longer prompts
    prefill in chunks) and new prompts waiting up to 2 steps to join the decoding ones."""
    model_dir = qwen3_dir if request.param.startswith("qwen3") else mixtral_dir
    expert_nodes = 0 if request.param.endswith("colocated") else 3
    extra = (["--transport", "gloo", "--microbatches", "2", "--async-scheduling", "--max-batch-tokens", "8",
              "--max-num-seqs", "8", "--max-waiting-steps", "2"] if request.param.endswith("gloo-async") else [])
    cluster = Cluster(model_dir, attention_nodes=2, expert_nodes=expert_nodes, extra=extra).wait_ready()
    yield cluster, model_dir
    cluster.stop()


def complete(client: httpx.Client, prompt, **fields) -> dict:
    response = client.post("/v1/completions", json={"prompt": prompt, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_tokens_and_logprobs_equal_transformers(served):
    assert_greedy_tokens_and_logprobs_equal_transformers(*served)


@pytest.mark.parametrize("extra", [[], ["--transport", "gloo", "--microbatches", "2"],
                                   ["--transport", "ucx-lockstep", "--microbatches", "2"]],
                         ids=["zmq", "lockstep-gloo", "lockstep-ucx"])
def test_deepseek_greedy_tokens_and_logprobs_equal_transformers(deepseek_dir, extra):
    """DeepSeek-V3 through real processes: its experts on expert nodes over messages (zmq) or the lockstep M2N (gloo
    or UCX links, 2 microbatches), MLA, shared experts and routing on the attention node; only this test, to keep the suite short
    (the other modes run in one process: test_exact_inproc.py)."""
    cluster = Cluster(deepseek_dir, attention_nodes=1, expert_nodes=2, extra=extra).wait_ready()
    try:
        assert_greedy_tokens_and_logprobs_equal_transformers(cluster, deepseek_dir, PROMPTS[:4], max_tokens=16)
    finally:
        cluster.stop()


def assert_greedy_tokens_and_logprobs_equal_transformers(cluster, model_dir, prompts=PROMPTS, max_tokens=32):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # as ignore_eos: plain greedy for all max_tokens
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with cluster.client() as client, ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda p: complete(client, p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                  return_token_ids=True, logprobs=0), prompts))
    for prompt, body in zip(prompts, bodies):
        choice = body["choices"][0]
        prompt_ids = tokenizer(prompt).input_ids
        assert choice["prompt_token_ids"] == prompt_ids
        with torch.no_grad():
            mask = torch.ones(1, len(prompt_ids), dtype=torch.long)  # no padding: every prompt id is real
            expected = reference.generate(torch.tensor([prompt_ids]), attention_mask=mask, max_new_tokens=max_tokens,
                                          do_sample=False, pad_token_id=0)[0, len(prompt_ids):].tolist()
            assert choice["token_ids"] == expected, f"prompt {prompt!r}"
            # logprobs are the logits of each forward pass, shifted by their logsumexp
            logits = reference(torch.tensor([prompt_ids + expected])).logits[0, len(prompt_ids) - 1:-1]
        expected_lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(expected)[:, None])[:, 0]
        got_lp = torch.tensor(choice["logprobs"]["token_logprobs"])
        assert (got_lp - expected_lp).abs().max().item() < 1e-4


def test_concurrent_requests_match_sequential(served):
    cluster, _ = served
    requests = [(PROMPTS[i % 8] * (1 + i % 3), 4 + 3 * i) for i in range(16)]  # different lengths
    with cluster.client() as client:
        alone = [complete(client, p, max_tokens=n, temperature=0.0, ignore_eos=True, return_token_ids=True)
                 for p, n in requests]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda r: complete(client, r[0], max_tokens=r[1], temperature=0.0,
                                                        ignore_eos=True, return_token_ids=True), requests))
    for (prompt, n), a, b in zip(requests, alone, together):
        assert len(b["choices"][0]["token_ids"]) == n
        assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"], prompt
        assert b["choices"][0]["finish_reason"] == "length"


def sse_events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    import json
    events = []
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            if line == "data: [DONE]":
                events.append("DONE")
    assert events[-1] == "DONE"
    return events[:-1]


def test_streamed_text_equals_non_streamed(served):
    cluster, _ = served
    with cluster.client() as client:
        for prompt in PROMPTS[:4]:
            body = {"prompt": prompt, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
            full = complete(client, **body)["choices"][0]["text"]
            events = sse_events(client, "/v1/completions", body)
            assert "".join(e["choices"][0]["text"] for e in events) == full
            assert events[-1]["choices"][0]["finish_reason"] == "length"
        chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0.0}
        full = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
        events = sse_events(client, "/v1/chat/completions", chat)
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == full


def test_stop_strings_and_seeded_sampling(served):
    cluster, _ = served
    with cluster.client() as client:
        free = complete(client, "hello world", max_tokens=24, temperature=0.0, ignore_eos=True)["choices"][0]["text"]
        stop = free[5:8]
        assert stop and stop in free
        stopped = complete(client, "hello world", max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
        assert stopped["choices"][0]["text"] == free[:free.index(stop)]
        assert stopped["choices"][0]["finish_reason"] == "stop"
        sampled = [complete(client, "hello", max_tokens=16, temperature=0.9, top_p=0.9, seed=7,
                            return_token_ids=True)["choices"][0]["token_ids"] for _ in range(2)]
        assert sampled[0] == sampled[1]


def test_health_models_and_metrics(served, request):
    cluster, _ = served
    expert_nodes = 0 if request.node.callspec.params["served"].endswith("colocated") else 3
    with cluster.client() as client:
        assert client.get("/health").status_code == 200
        models = client.get("/v1/models").json()
        assert models["data"][0]["id"]
        complete(client, "hello", max_tokens=2)

        def link_bytes():  # the nodes' counters as of their last status poll, which may predate the request
            metrics = client.get("/metrics").text
            sent = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("expertmesh_link_bytes_sent_total{")]
            computed = prometheus.by_label(prometheus.parse(metrics), "expertmesh_expert_tokens_total", "node")
            fresh = expert_nodes == 0 or (sum(sent) > 0 and sum(computed.values()) > 0)
            return (metrics, sent) if fresh else None

        metrics, sent = wait_for(link_bytes, 10, "the request's link bytes in /metrics")
    assert 'expertmesh_requests_total{outcome="completed"}' in metrics
    assert len(sent) == 2 * expert_nodes
    assert len(prometheus.by_label(prometheus.parse(metrics), "expertmesh_expert_tokens_total", "node")) == expert_nodes
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency", "request_queue_time"):
        assert prometheus.value(metrics, f"expertmesh_{histogram}_seconds_count") >= 1  # the request above, at least
    gauges = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if not line.startswith("#")}
    for node in (0, 1):
        assert 0.0 <= gauges[f'expertmesh_kv_cache_usage{{attention_node="{node}"}}'] <= 1.0
        assert gauges[f'expertmesh_kv_cache_blocks{{attention_node="{node}"}}'] > 0
        assert gauges[f'expertmesh_preemptions_total{{attention_node="{node}"}}'] == 0  # the cache is ample here


BAD_REQUESTS = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", {"prompt": 5}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}),
    ("/v1/completions", {"prompt": [1] * 600}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10_000}),
    ("/v1/completions", {"prompt": [10 ** 7]}),
    ("/v1/completions", {}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}),
    ("/v1/chat/completions", {"messages": "hello"}),
]


def test_bad_input_is_400_and_server_keeps_serving(served):
    cluster, _ = served
    with cluster.client() as client:
        for path, body in BAD_REQUESTS:
            if isinstance(body, bytes):
                response = client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                response = client.post(path, json=body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"], body
            assert complete(client, "hello", max_tokens=3)["choices"][0]["finish_reason"] in ("length", "stop")


def test_openai_client(served):
    cluster, model_dir = served
    import openai
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    assert model == model_dir.name
    completion = client.completions.create(model=model, prompt="hello", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens >= 1
    by_path = client.completions.create(model=str(model_dir), prompt="hello", max_tokens=8, temperature=0)
    assert (by_path.model, by_path.choices[0].text) == (model, completion.choices[0].text)  # vLLM's id: --model
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="not-" + model, prompt="hello", max_tokens=8)
    assert unknown.value.code == "model_not_found"
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True))
    assert streamed == chat.choices[0].message.content
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=model, prompt="hello", max_tokens=8, temperature=0, stream=True))
    assert streamed == completion.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hello", max_tokens=2)


@pytest.mark.parametrize("served", ["mixtral"], indirect=True)
def test_bench_serve_counts_every_streamed_token_of_a_real_gateway(served):
    """`bench serve`'s own HTTP client (bench/http.py) against uvicorn's chunked event streams and /metrics: every
    token of every request counted, none failed, and the nodes' counters read back."""
    import asyncio

    from expertmesh.bench.serve import Workload, run
    workload = Workload(num_requests=24, input_len=(4, 12), output_len=(7, 7), concurrency=12)
    report = asyncio.run(run(served[0].url, workload, progress=None))
    assert (report.requests, report.failed, report.output_tokens) == (24, 0, 24 * 7)
    assert set(report.idle_fraction) == {"attention_node_0", "attention_node_1", "expert_node_0", "expert_node_1",
                                         "expert_node_2"}
    assert report.ttft_ms["p50"] > 0 and report.client_cpu_s > 0
    # each attention node's share, from its own counter: every token, both nodes used
    assert sum(report.tokens_per_node.values()) == 24 * 7 and set(report.tokens_per_node) == {"a0", "a1"}
    assert min(report.tokens_per_node.values()) > 0
    # TTFT split: the gateway's part of the client's, and the nodes' queue within the gateway's
    assert 0 <= report.node_queue_ms <= report.gateway_ttft_ms <= report.ttft_ms["mean"]
