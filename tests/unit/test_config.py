"""Per-role shares of a GPU's SMs under CUDA MPS (cluster.*_sm_percent): from the launch flags to the environment
each node gives CUDA before it starts, and the bad values refused."""
import argparse
import os

import pytest

from expertmesh.cli import _launch_parser, config_from_args
from expertmesh.config import Config, ConfigError
from expertmesh.process import before_cuda_starts


def test_each_role_gets_its_share_of_the_sms_before_cuda_starts(monkeypatch):
    parser = argparse.ArgumentParser()
    _launch_parser(parser.add_subparsers(dest="command"))
    config = config_from_args(parser.parse_args(["launch", "--device", "cuda", "--transport", "ucx",
                                                 "--attention-sm-percent", "70", "--expert-sm-percent", "30"]))
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    before_cuda_starts(config, "expert", 0)
    assert os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    before_cuda_starts(config, "attention", 0)
    assert os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "70"
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    before_cuda_starts(Config(), "attention", 0)  # no share: CUDA's default, all of them
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in os.environ


@pytest.mark.parametrize("device,share", [("cuda", 0), ("cuda", 101), ("cpu", 50)])
def test_a_share_out_of_range_or_without_a_gpu_is_refused(device, share):
    config = Config()
    config.model.device, config.transport.backend, config.cluster.expert_sm_percent = device, "ucx", share
    with pytest.raises(ConfigError, match="expert_sm_percent"):
        config.validate()


def test_steps_with_prompts_replay_graphs_up_to_the_budget_unless_capped():
    engine = Config().engine
    assert engine.prefill_graph_tokens is None and engine.graph_prefill_limit() == engine.max_batch_tokens
    engine.prefill_graph_tokens = 512
    assert engine.graph_prefill_limit() == 512
    engine.max_batch_tokens = 256
    assert engine.graph_prefill_limit() == 256  # never past what a step may feed
    config = Config()
    config.engine.prefill_graph_tokens = -1
    with pytest.raises(ConfigError, match="prefill_graph_tokens"):
        config.validate()
