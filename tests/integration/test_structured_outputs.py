"""Structured outputs and tool calling through the whole path (the official openai client and HTTP -> gateway ->
attention node, colocated experts), on a small random model sampled at temperature 1: such a model never writes
valid JSON by itself, so every output that parses proves the grammar's token mask (and one without it that does not
parse proves the model alone would not)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from expertmesh.model.make_model import RandomModelShape, make_model

from .cluster import Cluster

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "[A-Za-z ]{1,6}"}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 2}},
    "required": ["name", "age", "ok"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "pattern": "[A-Za-z]{1,8}"}, "days": {"type": "integer",
                                                                                       "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLED = {"temperature": 1.0, "max_tokens": 160}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # the small tokenizer spends ~600 tokens on two tools' definitions: a context of 2048
    model_dir = make_model(tmp_path_factory.mktemp("mixtral2k"),
                           RandomModelShape(arch="mixtral", max_position_embeddings=2048), seed=1)
    cluster = Cluster(model_dir, attention_nodes=1, expert_nodes=0).wait_ready()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def client(cluster):
    import openai
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_json_schema_and_json_object_outputs_always_parse(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in (0, 1):
        chat = client.chat.completions.create(model=model, messages=MESSAGES, n=3,
                                              seed=seed, response_format=fmt, **SAMPLED)
        for choice in chat.choices:
            assert choice.finish_reason == "stop", choice  # the grammar completed, then ended the output
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    # vLLM's guided_json on completions, streamed: the chunks join to the same valid object
    texts = {}
    for stream in (False, True):
        response = client.completions.create(model=model, prompt="person:", seed=7, stream=stream,
                                             extra_body={"guided_json": SCHEMA}, **SAMPLED)
        texts[stream] = "".join(c.choices[0].text for c in response) if stream else response.choices[0].text
    assert texts[True] == texts[False]
    jsonschema.validate(json.loads(texts[True]), SCHEMA)
    free = client.completions.create(model=model, prompt="person:", seed=7, **SAMPLED).choices[0].text
    with pytest.raises(ValueError):  # the same draw without the mask
        json.loads(free)
    for seed in range(3):
        body = client.chat.completions.create(model=model, messages=MESSAGES, seed=seed,
                                              response_format={"type": "json_object"}, **SAMPLED)
        json.loads(body.choices[0].message.content)


def test_guided_choice_regex_and_structured_outputs(client, model):
    choices = ["yes", "no", "maybe not"]
    for seed in range(4):
        text = client.completions.create(model=model, prompt="ok?", seed=seed, extra_body={"guided_choice": choices},
                                         **SAMPLED).choices[0].text
        assert text in choices
    pattern = r"[A-Z][a-z]{2,5}-\d{3}"
    outputs = client.completions.create(model=model, prompt="code:", seed=3, n=4, extra_body={"guided_regex": pattern},
                                        **SAMPLED).choices
    assert all(re.fullmatch(pattern, c.text) for c in outputs) and len({c.text for c in outputs}) > 1
    chat = client.chat.completions.create(model=model, messages=MESSAGES, seed=1, **SAMPLED,
                                          extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert chat.choices[0].message.content in ("up", "down")


def test_named_and_required_tool_choice_return_a_call_that_follows_the_schema(client, model):
    tools = [WEATHER, CLOCK]
    for seed in range(3):
        named = client.chat.completions.create(model=model, messages=MESSAGES, tools=tools, seed=seed, **SAMPLED,
                                               tool_choice={"type": "function", "function": {"name": "get_weather"}})
        message = named.choices[0].message
        assert named.choices[0].finish_reason == "stop" and message.content is None  # a forced call: OpenAI's
        (call,) = message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    for seed in range(4):
        required = client.chat.completions.create(model=model, messages=MESSAGES, tools=tools, seed=seed, **SAMPLED,
                                                  tool_choice="required", parallel_tool_calls=False)
        (call,) = required.choices[0].message.tool_calls
        schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    assert required.choices[0].finish_reason == "tool_calls"


def test_a_streamed_call_comes_as_a_tool_call_delta(client, model):
    forced = {"type": "function", "function": {"name": "get_time"}}
    whole = client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER, CLOCK], seed=5,
                                           tool_choice=forced, **SAMPLED).choices[0]
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER, CLOCK], seed=5,
                                                 tool_choice=forced, stream=True, **SAMPLED))
    deltas = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.type, d.function.name) for d in deltas] == [(0, "function", "get_time")]
    assert deltas[0].function.arguments == whole.message.tool_calls[0].function.arguments
    assert json.loads(deltas[0].function.arguments)["zone"] in ("utc", "cet")
    assert chunks[-1].choices[0].finish_reason == "stop"  # a named function's call, as OpenAI ends it
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""


def test_auto_without_a_call_is_text_and_none_ignores_tools(client, model):
    """The random model writes no call by itself: auto returns its text, as none does, and a conversation with an
    earlier call and its result is taken."""
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    outputs = {}
    for choice in ("auto", "none"):
        chat = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice=choice,
                                              seed=2, temperature=1.0, max_tokens=24)
        message = chat.choices[0].message
        assert message.tool_calls is None and chat.choices[0].finish_reason in ("stop", "length")
        outputs[choice] = message.content
    assert outputs["auto"] == outputs["none"] and outputs["auto"]
