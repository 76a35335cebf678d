"""--api-key: the API and the admin endpoints need `Authorization: Bearer <key>`; /health and /metrics stay open."""
from pathlib import Path

from fastapi.testclient import TestClient

from expertmesh.bench import prometheus
from expertmesh.gateway.app import ServedModel, create_app
from expertmesh.gateway.text import TextCodec

MODEL = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"


def served(api_key):
    return create_app(ServedModel("mini", 512, 256, TextCodec(MODEL), nodes=[], api_key=api_key))


def test_api_key_guards_the_api_not_health_or_metrics():
    with TestClient(served("s3cret")) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 401
        assert client.post("/admin/trace/start").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert prometheus.value(metrics.text, "expertmesh_requests_total", outcome="rejected") == 5


def test_without_a_key_the_api_is_open():
    with TestClient(served(None)) as client:
        assert client.get("/v1/models").status_code == 200
