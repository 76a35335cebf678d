"""Served model names as vLLM has them: --model as given and the directory's name are both accepted; with
--served-model-name, its names; the first is shown and reported; an unknown name gets OpenAI's 404 body."""
import argparse
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from expertmesh.cli import _launch_parser, config_from_args
from expertmesh.config import Config, ConfigError
from expertmesh.gateway.__main__ import served_model_names
from expertmesh.gateway.app import ServedModel, create_app
from expertmesh.gateway.text import TextCodec
from expertmesh.model.spec import ModelSpec

MODEL = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"


def launch_config(*flags: str) -> Config:
    parser = argparse.ArgumentParser()
    _launch_parser(parser.add_subparsers(dest="command"))
    return config_from_args(parser.parse_args(["launch", *flags]))


def test_default_names_are_the_directory_and_the_model_argument_as_given():
    assert served_model_names(launch_config("--model", "models/expertmesh-mini")) == \
        ["expertmesh-mini", "models/expertmesh-mini"]
    assert served_model_names(launch_config("--model", "./models/expertmesh-mini/")) == \
        ["expertmesh-mini", "./models/expertmesh-mini/", "models/expertmesh-mini"]
    assert served_model_names(launch_config("--model", str(MODEL))) == ["expertmesh-mini", str(MODEL)]


def test_served_model_name_takes_several_names_and_replaces_the_defaults():
    config = launch_config("--model", "models/expertmesh-mini", "--served-model-name", "mini", "org/mini", "mini")
    assert config.gateway.served_model_names == ["mini", "org/mini", "mini"]
    assert served_model_names(config) == ["mini", "org/mini"]
    for bad in ("mini", [""], [3], None):
        with pytest.raises(ConfigError, match="served_model_names"):
            Config.from_dict({"gateway": {"served_model_names": bad}})


def test_every_name_is_accepted_the_first_reported_and_an_unknown_one_is_404():
    served = ServedModel("mini", ModelSpec.from_dir(MODEL).vocab_size, 256, TextCodec(MODEL), nodes=[],
                         aliases=("models/mini", "org/mini"))
    with TestClient(create_app(served)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["mini"]
        # a known name passes the name check and meets the next one: max_tokens past the context is a 400
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}
        for name in ("mini", "models/mini", "org/mini", None):
            response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10_000, "model": name})
            assert (response.status_code, response.json()["error"]["param"]) == (400, "max_tokens"), response.text
            response = client.post("/v1/chat/completions", json={**chat, "model": name})
            assert (response.status_code, response.json()["error"]["param"]) == (400, "max_tokens"), response.text
        for name in ("other", "Mini", "mini/", ""):
            response = client.post("/v1/completions", json={"prompt": "hi", "model": name})
            assert response.status_code == 404, response.text
            assert response.json() == {"error": {
                "message": f"The model `{name}` does not exist; this server serves `mini`",
                "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
            assert client.post("/v1/chat/completions", json={**chat, "model": name}).status_code == 404


def test_the_gateway_serves_http_with_httptools():
    """uvicorn's C parser, a dependency: with its pure-Python one the gateway spent 14% more CPU per streamed token."""
    from expertmesh.gateway.__main__ import server_config
    server = server_config(lambda scope, receive, send: None, Config())
    server.load()
    assert server.http_protocol_class.__module__.endswith("httptools_impl")
