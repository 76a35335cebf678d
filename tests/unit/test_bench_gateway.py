"""`expertmesh bench gateway`: the gateway's CPU per streamed token, measured through real gateway processes, and the
calibration file entry that hands it to the planner."""
import json

import pytest

from expertmesh.bench.gateway import measure, vocab_size
from expertmesh.config import ConfigError
from expertmesh.planner import calibration
from expertmesh.planner.served import GATEWAY_US_PER_MESSAGE

MODEL = "models/expertmesh-mini"


def test_every_token_the_stand_in_paced_is_streamed_and_the_gateways_cpu_is_counted_per_token():
    runs = measure(MODEL, workers=2, requests=48, tokens=12, concurrency=16, step_ms=2.0, client_processes=2,
                   repeats=1)
    (run,) = runs
    assert run.failed == 0 and run.tokens == 48 * 12 and run.client_processes == 2
    assert len(run.cpu_s) == 2 and all(cpu > 0 for cpu in run.cpu_s)
    # a step message for each gateway with requests in it: at least one step per token of a request, at most one
    # per token per gateway process
    assert 12 <= run.messages <= 2 * 48 * 12
    assert run.us_per_message == GATEWAY_US_PER_MESSAGE
    total = sum(run.cpu_s) * 1e6
    assert run.us_per_token == pytest.approx(max(0.0, total - run.messages * GATEWAY_US_PER_MESSAGE) / run.tokens)
    assert run.tokens_per_s == pytest.approx(run.tokens / run.seconds)


def test_bad_arguments_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="workers must be at least 1"):
        measure(MODEL, workers=0)
    with pytest.raises(ValueError, match="longer than 0 ms"):
        measure(MODEL, step_ms=0)
    with pytest.raises(ValueError, match="no config.json with a vocab_size"):  # the stand-in's tokens come from it
        measure(str(tmp_path))
    assert vocab_size(MODEL) == 6144


def test_a_calibration_files_bench_gateway_entry_sets_the_gateway_costs(tmp_path):
    runs = [{"us_per_token": 40.0, "us_per_message": 235.0}, {"us_per_token": 52.0, "us_per_message": 235.0},
            {"us_per_token": 47.0, "us_per_message": 235.0}]
    (tmp_path / "gateway.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "cal.json").write_text(json.dumps({**calibration.H200.to_dict(), "bench_gateway": "gateway.json"}))
    cal = calibration.load(str(tmp_path / "cal.json"))
    assert (cal.gateway_us_per_token, cal.gateway_us_per_message) == (47.0, 235.0)  # the median run
    assert cal.attention == calibration.H200.attention  # the rest as saved
    (tmp_path / "gateway.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(ConfigError, match="without runs"):
        calibration.load(str(tmp_path / "cal.json"))
