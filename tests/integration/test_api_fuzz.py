"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis) against a real cluster: for requests valid and
invalid by the schema (its examples, then random ones), every response is a status the schema
documents, with a documented content type and body (each server-sent event of a stream included), invalid requests
are refused, and none is a 5xx or a hang. Bounded: a 64-token context, the schema's examples and 25 random requests
per endpoint (schemathesis' coverage phase of boundary values would double the time)."""
from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from expertmesh.gateway.app import ServedModel, create_app
from expertmesh.gateway.text import TextCodec

from .cluster import Cluster

pytestmark = pytest.mark.slow



@schemathesis.check
def no_server_error(ctx, response, case):
    """not_a_server_error, but for the documented 504 of a request whose own `timeout` passed (a generated one
    may be a millisecond)."""
    if response.status_code == 504 and isinstance(case.body, dict) and case.body.get("timeout") is not None:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


# The schema the gateway serves depends on no model or node: built here (tests are made from it before any cluster
# runs), and compared with the one the cluster serves below.
MODEL = Path(__file__).resolve().parents[2] / "models" / "expertmesh-mini"
API = create_app(ServedModel("any", 1, 1, TextCodec(MODEL), nodes=[])).openapi()
schema = schemathesis.openapi.from_dict(API)
schema.config.generation.update(modes=["positive", "negative"], deterministic=True, max_examples=25)
schema.config.phases.update(phases=["examples", "fuzzing"])


@pytest.fixture(scope="module")
def cluster(mixtral_dir):
    """The gateway and one attention node with the experts inside (the API is what is fuzzed; the M2N paths have their
    own tests); a 64-token context keeps every generation short."""
    cluster = Cluster(mixtral_dir, attention_nodes=1, expert_nodes=0, extra=["--max-model-len", "64"]).wait_ready()
    yield cluster
    cluster.stop()


def test_the_gateway_serves_this_schema(cluster):
    with cluster.client() as client:
        assert client.get("/openapi.json").json() == API


@schema.parametrize()
@settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_response_is_documented_and_none_is_a_server_error(case, cluster):
    case.call_and_validate(base_url=cluster.url, checks=CHECKS, timeout=30)
