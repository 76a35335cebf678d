"""The gateway's policy for request parameters (issue 15, item 7), its checks of the sampling parameters, the merge of
n samples into one response's choices (gateway/choices.py), and stop strings held off until min_tokens."""
import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from expertmesh.gateway import choices
from expertmesh.gateway.app import ServedModel, create_app
from expertmesh.gateway.text import TextCodec, TextStream
from expertmesh.model.spec import ModelSpec
from expertmesh.transport.protocol import SamplingParams

MODEL = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"
VOCAB = ModelSpec.from_dir(MODEL).vocab_size
PATHS = {"/v1/completions": {"prompt": "hi", "max_tokens": 4},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}


@pytest.fixture(scope="module")
def client():
    served = ServedModel("mini", VOCAB, 256, TextCodec(MODEL), nodes=[], node_wait_s=0.0)
    with TestClient(create_app(served)) as client:
        yield client


def post(client, path, **fields):
    return client.post(path, json={**PATHS[path], **fields})


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fields, param", [
    ({"suffix": "x"}, "suffix"), ({"use_beam_search": True}, "use_beam_search"),
    # structured outputs that cannot be met (gateway/structured.py): malformed, or two at once
    ({"response_format": {"type": "json_schema"}}, "response_format"), ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "(ab"}, "guided_regex"), ({"guided_json": {"type": "objectx"}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"), ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"logit_bias": {str(VOCAB): 1.0}}, "logit_bias"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"n": 2, "best_of": 1}, "best_of"), ({"best_of": 2, "stream": True}, "best_of"),
    ({"min_tokens": 5}, "min_tokens"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"), ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n"), ({"seed": 2**63}, "seed")])
def test_what_the_server_cannot_honour_is_a_400_naming_the_parameter(client, path, fields, param):
    response = post(client, path, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"], error


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"tools": [TOOL]}, "tools"),  # chat's alone, as OpenAI's
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),  # no tools to call
    ("/v1/chat/completions", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"tools": [TOOL], "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "objectx"}}}], "tool_choice": "required"}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages")])
def test_tool_calls_that_cannot_be_met_are_a_400_naming_the_parameter(client, path, fields, param):
    response = post(client, path, **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("path", PATHS)
def test_parameters_that_ask_for_nothing_and_unknown_fields_pass_with_one_warning(client, path, caplog):
    """They pass the checks and reach the next step: no attention node is ready here, so a 503."""
    caplog.set_level(logging.WARNING, logger="expertmesh.gateway.schema")
    harmless = {"suffix": None, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "user": "u",
                "logit_bias": {str(VOCAB - 1): 200.0}, "stop_token_ids": [0], "n": 2, "best_of": 3, "top_k": -1,
                "min_tokens": 4, "repetition_penalty": 1.2, "min_p": 0.1}
    for _ in range(2):
        assert post(client, path, **harmless, made_up_field=1).status_code == 503
    warnings = [r.getMessage() for r in caplog.records if "made_up_field" in r.getMessage()]
    assert len(warnings) <= 1 and not any("'user'" in r.getMessage() for r in caplog.records)


def test_the_first_unknown_field_warns_once(caplog):
    from expertmesh.gateway.schema import CompletionRequest
    caplog.set_level(logging.WARNING, logger="expertmesh.gateway.schema")
    for _ in range(3):
        assert CompletionRequest(prompt="x", never_seen_before=1).unsupported_field() is None
    assert [r.getMessage() for r in caplog.records].count(
        "ignoring the unknown request field 'never_seen_before' (warned once per name)") == 1


def test_samples_draw_with_seed_plus_index_and_rank_by_cumulative_logprob():
    params = choices.sample_params(SamplingParams(seed=2**63 - 2, logprobs=None), 3, ranked=True)
    assert [p.seed for p in params] == [2**63 - 2, 2**63 - 1, -2**63]  # int64, wrapping as vLLM's int64 would
    assert all(p.logprobs == 0 for p in params)  # ranked: each token's logprob comes back
    unseeded = choices.sample_params(SamplingParams(logprobs=2), 2, ranked=False)
    assert unseeded[1].seed == unseeded[0].seed + 1 and unseeded[0].logprobs == 2
    alone = SamplingParams(seed=None)
    assert choices.sample_params(alone, 1, ranked=False) == [alone]
    outputs = [SimpleNamespace(name=name, logprobs=[[lp, []] for lp in lps])
               for name, lps in (("a", [-1.0, -1.0]), ("b", [-0.5]), ("c", [-0.1, -0.2, -0.3]))]
    assert [o.name for o in choices.best(outputs, 2)] == ["b", "c"]  # sums: -2, -0.5, -0.6


async def numbers(values, fail_at=None, closed=None):
    try:
        for value in values:
            await asyncio.sleep(0)
            if value == fail_at:
                raise RuntimeError("boom")
            yield value
    finally:
        if closed is not None:
            closed.append(values[0])


def test_interleave_keeps_each_streams_order_and_a_failure_cancels_the_rest():
    async def run():
        merged = [item async for item in choices.interleave([numbers([1, 2, 3]), numbers([10, 20])])]
        assert sorted(merged) == [(0, 1), (0, 2), (0, 3), (1, 10), (1, 20)]
        assert [v for i, v in merged if i == 0] == [1, 2, 3]
        closed = []
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in choices.interleave([numbers([1, 2], fail_at=2, closed=closed),
                                               numbers(list(range(100, 10_000)), closed=closed)]):
                pass
        await asyncio.sleep(0)
        assert sorted(closed) == [1, 100]  # the failed one, and the long one cancelled, both ran their cleanup
    asyncio.run(run())


def test_stop_strings_are_not_searched_in_the_first_min_tokens():
    codec = TextCodec(MODEL)
    ids = codec.encode("ab ab ab ab")[1:]  # without BOS: "ab", " ab", " ab", " ab"
    outcomes = {}
    for min_tokens in (0, 3):
        stream = TextStream(codec, ["ab"], min_tokens)
        text = ""
        for i, token in enumerate(ids):
            delta = stream.push([token], final=i == len(ids) - 1)
            text += delta.text
            if delta.stopped:
                break
        outcomes[min_tokens] = (text, delta.stopped)
    assert outcomes == {0: ("", True), 3: ("ab ab ab ", True)}  # vLLM: searched from the (min_tokens + 1)-th token on


def test_the_openapi_docs_list_the_parameters_and_the_policy(client):
    api = client.get("/openapi.json").json()
    for path in PATHS:
        description = api["paths"][path]["post"]["description"]
        for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "logit_bias", "min_tokens", "stop_token_ids", "n", "best_of", "suffix",
                     "response_format", "guided_json", "guided_regex", "guided_choice", "tools", "tool_choice"):
            assert f"`{name}`" in description, name
