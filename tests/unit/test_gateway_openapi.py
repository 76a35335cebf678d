"""The gateway's OpenAPI schema describes what it really answers: errors as 400s with OpenAI's body (never FastAPI's
422 or {"detail": ...}), streams as server-sent events of documented chunks, and examples that are valid requests.
(tests/integration/test_api_fuzz.py fuzzes a real cluster from this schema.)"""
import json
from pathlib import Path

from fastapi.testclient import TestClient

from expertmesh.gateway.app import ServedModel, create_app
from expertmesh.gateway.schema import ChatRequest, CompletionRequest
from expertmesh.gateway.text import TextCodec

MODEL = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"


def app(api_key=None):
    return create_app(ServedModel("mini", 512, 256, TextCodec(MODEL), nodes=[], api_key=api_key))


def test_every_endpoint_documents_its_responses_and_none_documents_422():
    api = app().openapi()
    operations = {(method, path): operation for path, methods in api["paths"].items()
                  for method, operation in methods.items()}
    assert set(operations) == {("get", "/health"), ("get", "/metrics"), ("get", "/v1/models"),
                               ("post", "/v1/completions"), ("post", "/v1/chat/completions"),
                               ("post", "/admin/trace/start"), ("post", "/admin/trace/stop")}
    assert "422" not in json.dumps(api) and "HTTPValidationError" not in api["components"]["schemas"]
    for path, chunk in (("/v1/completions", "CompletionChunk"), ("/v1/chat/completions", "ChatCompletionChunk")):
        responses = operations["post", path]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "429", "500", "503", "504"}
        assert all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
                   for status, r in responses.items() if status != "200")
        event = responses["200"]["content"]["text/event-stream"]["schema"]
        assert chunk in json.dumps(event) and chunk in api["components"]["schemas"]
    assert set(operations["get", "/metrics"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(operations["get", "/health"]["responses"]) == {"200", "503"}


def test_the_documented_examples_are_valid_requests():
    schemas = app().openapi()["components"]["schemas"]
    for model in (CompletionRequest, ChatRequest):
        examples = schemas[model.__name__]["examples"]
        assert len(examples) == 2
        for example in examples:
            model.model_validate_json(json.dumps(example))  # strict, as the API reads bodies


def test_starlettes_own_errors_get_openais_error_body():
    with TestClient(app()) as client:
        not_utf8 = client.post("/v1/completions", content=b"\xff\xfe", headers={"content-type": "application/json"})
        unknown = client.get("/v2/nothing")
        wrong_method = client.get("/v1/completions")
    for response, status in ((not_utf8, 400), (unknown, 404), (wrong_method, 405)):
        assert response.status_code == status
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], response.text


def test_with_an_api_key_the_api_says_it_needs_the_bearer():
    assert "securitySchemes" not in app().openapi()["components"]
    api = app("s3cret").openapi()
    assert api["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
    needs = {path: "security" in operation for path, methods in api["paths"].items() for operation in methods.values()}
    assert needs == {"/health": False, "/metrics": False, "/v1/models": True, "/v1/completions": True,
                     "/v1/chat/completions": True, "/admin/trace/start": True, "/admin/trace/stop": True}
