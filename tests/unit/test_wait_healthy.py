"""The launcher's readiness (launcher/supervision.py::wait_healthy): with several gateway processes on one port,
ready only once each has answered /health with 200, whichever the kernel hands the polls to."""
import io
import json
import urllib.request

import pytest

from expertmesh.launcher import ClusterError, supervision


class Answer(io.BytesIO):
    status = 200

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def polls(workers: list[int], monkeypatch) -> list[int]:
    """wait_healthy against a gateway whose /health answers come from `workers` in turn; the answers it took."""
    taken = []

    def urlopen(url, timeout):
        worker = workers[len(taken)]
        taken.append(worker)
        return Answer(json.dumps({"status": "ok", "worker": worker}).encode())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(supervision, "POLL_S", 0.001)
    monkeypatch.setattr(supervision, "check_started", lambda nodes: None)
    supervision.wait_healthy("http://gateway", [], timeout_s=5, workers=2)
    return taken


def test_ready_once_every_gateway_worker_has_answered(monkeypatch):
    # worker 1 bound the port late: the first polls all reach worker 0
    assert polls([0, 0, 0, 1, 0], monkeypatch) == [0, 0, 0, 1]


def test_a_worker_that_never_serves_is_named_when_time_runs_out(monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: Answer(json.dumps({"status": "ok", "worker": 0}).encode()))
    monkeypatch.setattr(supervision, "POLL_S", 0.001)
    monkeypatch.setattr(supervision, "check_started", lambda nodes: None)
    with pytest.raises(ClusterError, match=r"gateway workers serving: \[0\] of 2"):
        supervision.wait_healthy("http://gateway", [], timeout_s=0.05, workers=2)
