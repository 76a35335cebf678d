import asyncio

import pytest
import torch

from expertmesh.cli import config_from_args, main
from expertmesh.config import Config, ConfigError
from expertmesh.model.spec import ModelSpec
from expertmesh.placement.plan import Placement, PlacementError
from expertmesh.transport.base import TransportError
from expertmesh.transport.inproc import InprocTransport
from expertmesh.m2n.messages import M2NClient
from expertmesh.transport.protocol import HelloReply


def test_config_round_trip_and_errors(tmp_path):
    config = Config()
    config.cluster.expert_nodes = 3
    config.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == config
    (tmp_path / "c.yaml").write_text("cluster:\n  attention_nodes: 2\nengine:\n  microbatches: 2\n")
    loaded = Config.load(tmp_path / "c.yaml")
    assert loaded.cluster.attention_nodes == 2 and loaded.engine.microbatches == 2
    with pytest.raises(ConfigError, match="unknown keys \\['colour'\\]"):
        Config.from_dict({"model": {"colour": "red"}})
    with pytest.raises(ConfigError, match="microbatches=0"):
        Config.from_dict({"engine": {"microbatches": 0}})


def test_cli_flags_override_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("cluster:\n  attention_nodes: 2\n  expert_nodes: 4\n")
    import argparse
    args = argparse.Namespace(config=str(tmp_path / "c.yaml"), model="m", attention_nodes=None, expert_nodes=3,
                              host=None, port=9000, placement=None, transport=None, microbatches=None, dtype=None,
                              max_num_seqs=None, max_model_len=None, served_model_name=None)
    config = config_from_args(args)
    assert (config.model.path, config.cluster.attention_nodes, config.cluster.expert_nodes, config.gateway.port) == \
        ("m", 2, 3, 9000)


def test_the_ipc_copy_and_gateway_workers_are_flags_and_checked():
    import argparse

    from expertmesh.cli import _launch_parser
    parser = argparse.ArgumentParser()
    _launch_parser(parser.add_subparsers(dest="command"))
    assert config_from_args(parser.parse_args(["launch", "--ipc-copy", "sm"])).transport.ipc_copy == "sm"
    assert config_from_args(parser.parse_args(["launch"])).transport.ipc_copy == "engine"
    with pytest.raises(ConfigError, match="ipc_copy='dma'"):
        Config.from_dict({"transport": {"ipc_copy": "dma"}})
    assert config_from_args(parser.parse_args(["launch", "--gateway-workers", "3"])).gateway.workers == 3
    with pytest.raises(ConfigError, match="gateway.workers=0"):
        Config.from_dict({"gateway": {"workers": 0}})
    assert config_from_args(parser.parse_args(["launch", "--stream-interval", "4"])).gateway.stream_interval == 4
    assert config_from_args(parser.parse_args(["launch"])).gateway.stream_interval == 1
    with pytest.raises(ConfigError, match="gateway.stream_interval=0"):
        Config.from_dict({"gateway": {"stream_interval": 0}})


def test_make_model_command(tmp_path, capsys):
    assert main(["make-model", "--arch", "qwen3_moe", "--out", str(tmp_path / "q"), "--num-layers", "3",
                 "--mlp-only-layers", "1", "--no-norm-topk-prob"]) == 0
    spec = ModelSpec.from_dir(tmp_path / "q")
    assert spec.num_layers == 3 and spec.moe_layers == (True, False, True) and not spec.norm_topk_prob
    assert main(["make-model", "--arch", "deepseek_v3", "--out", str(tmp_path / "d"), "--first-k-dense-replace", "2",
                 "--q-lora-rank", "0", "--num-expert-groups", "2", "--top-groups", "1", "--yarn-factor", "8"]) == 0
    spec = ModelSpec.from_dir(tmp_path / "d")
    assert spec.moe_layers == (False, False, True, True) and spec.mla.q_lora_rank is None
    assert (spec.num_expert_groups, spec.top_groups, spec.rope.rope_type, spec.rope.factor) == (2, 1, "yarn", 8.0)


def test_contiguous_placement_and_file_validation(mixtral_dir, tmp_path):
    spec = ModelSpec.from_dir(mixtral_dir)
    placement = Placement.contiguous(spec, 3)
    assert [n[0] for n in placement.nodes_of[0]] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert len(placement.pairs_on(2)) == 2 * spec.num_layers
    path = tmp_path / "p.json"
    path.write_text(placement.to_json())
    assert Placement.load(path, spec, 3) == placement
    with pytest.raises(PlacementError, match="for 3 expert nodes, cluster has 2"):
        Placement.load(path, spec, 2)
    bad = Placement(3, {**placement.nodes_of, 0: placement.nodes_of[0][:-1]})
    with pytest.raises(PlacementError, match="lists 7 experts"):
        bad.validate(spec)
    with pytest.raises(PlacementError, match="some nodes would hold nothing"):
        Placement.contiguous(spec, 9)


def test_dispatch_sends_each_token_once_per_node_and_a_lost_node_fails_fast(mixtral_dir):
    spec = ModelSpec.from_dir(mixtral_dir)

    async def run():
        transport = InprocTransport()
        listeners = [await transport.listen(f"inproc://m2n{n}") for n in range(2)]
        conns = [await transport.connect(f"inproc://m2n{n}") for n in range(2)]
        m2n = M2NClient(conns, Placement.contiguous(spec, 2), 0, recv_timeout_s=0.3)
        hello = asyncio.gather(*(m2n.handshake(spec.num_layers, spec.num_experts, 5.0),))
        for n, listener in enumerate(listeners):
            peer, _ = await listener.recv()
            held = [l * spec.num_experts + e for l, e in m2n.placement.pairs_on(n)]
            await listener.send(peer, HelloReply(n, held))
        await hello
        ids = torch.tensor([[0, 1], [0, 5], [6, 7]], dtype=torch.int32)  # node 0 holds 0-3, node 1 holds 4-7
        handle = await m2n.dispatch(1, 0, 0, torch.randn(3, spec.hidden_size), ids, torch.rand(3, 2))
        _, to_node0 = await listeners[0].recv()
        _, to_node1 = await listeners[1].recv()
        assert to_node0.expert_ids.tolist() == [[0, 1], [0, -1]]
        assert to_node1.expert_ids.tolist() == [[-1, 5], [6, 7]]
        assert handle.rows_of_node[0].tolist() == [0, 1] and handle.rows_of_node[1].tolist() == [1, 2]
        with pytest.raises(TransportError, match="did not answer layer 0 of step 1 within 0.3 s"):
            await m2n.combine(handle, torch.zeros(3, spec.hidden_size))
        # the next layer reuses the same send buffers instead of allocating new ones (node 0, silent, is lost)
        await m2n.dispatch(1, 1, 0, torch.randn(2, spec.hidden_size), (ids[1:] + 4 * (ids[1:] < 4)).int(), torch.rand(2, 2))
        _, again = await listeners[1].recv()
        assert again.hidden.data_ptr() == to_node1.hidden.data_ptr() and again.layer == 1
        await m2n.close()

    asyncio.run(run())


def test_replicas_local_first_then_spill_chosen_once_per_step(mixtral_dir):
    spec = ModelSpec.from_dir(mixtral_dir)
    contiguous = Placement.contiguous(spec, 2)  # node 0 holds 0-3, node 1 holds 4-7
    layer0 = [list(nodes) for nodes in contiguous.nodes_of[0]]
    layer0[0] = [0, 1]  # expert 0 of layer 0 also on node 1, which is in the other domain
    placement = Placement(2, {**contiguous.nodes_of, 0: layer0})

    async def run():
        transport = InprocTransport()
        listeners = [await transport.listen(f"inproc://rep{n}") for n in range(2)]
        conns = [await transport.connect(f"inproc://rep{n}") for n in range(2)]
        m2n = M2NClient(conns, placement, 0, recv_timeout_s=1.0, attention_domain=0, expert_domain=[0, 1],
                        load_bound=1.1)
        hello = asyncio.ensure_future(m2n.handshake(spec.num_layers, spec.num_experts, 5.0))
        for n, listener in enumerate(listeners):
            peer, _ = await listener.recv()
            await listener.send(peer, HelloReply(n, [l * spec.num_experts + e for l, e in placement.pairs_on(n)]))
        await hello

        async def send(step, microbatch, ids):
            ids = torch.tensor(ids, dtype=torch.int32)
            handle = await m2n.dispatch(step, 0, microbatch, torch.randn(len(ids), spec.hidden_size), ids,
                                        torch.rand(len(ids), 2))
            return {n: (await listeners[n].recv())[1].expert_ids.tolist() for n in handle.rows_of_node}

        # no load yet: expert 0 goes to its replica in our own domain; node 0 now carries 3 rows, node 1 one
        assert await send(1, 0, [[0, 1], [0, 1], [0, 4]]) == {0: [[0, 1], [0, 1], [0, -1]], 1: [[-1, 4]]}
        # same step, next microbatch: the choice made for the step stands
        assert await send(1, 1, [[0, 4]]) == {0: [[0, -1]], 1: [[-1, 4]]}
        # next step: node 0 is above 1.1 x the mean load, so expert 0 spills to the remote replica
        assert await send(2, 0, [[0, 4]]) == {1: [[0, 4]]}
        await m2n.close()

    asyncio.run(run())


def test_auto_transport_is_ipc_on_gpus_and_sharing_a_gpu_without_mps_is_named(monkeypatch, tmp_path):
    from expertmesh.config import Config
    from expertmesh.launcher import local
    from expertmesh.transport.base import resolve_backend
    assert resolve_backend("auto", "cuda") == "lockstep"  # ipc on one host (tests/unit/test_link_plan.py)
    assert resolve_backend("auto", "cpu") in ("ucx", "zmq")
    assert resolve_backend("nccl", "cuda") == "nccl"
    config = Config()
    config.model.device, config.transport.backend = "cuda", "ipc"
    config.cluster.attention_gpus, config.cluster.expert_gpus = [0], [0, 1]
    monkeypatch.setattr(local, "MPS_PIPE", str(tmp_path / "no-mps"))
    notes = local.LocalCluster(config, tmp_path).notes()
    assert len(notes) == 1 and "['cuda:0']" in notes[0] and "nvidia-cuda-mps-control -d" in notes[0]
    (tmp_path / "no-mps").mkdir()  # MPS runs: nothing to say
    assert local.LocalCluster(config, tmp_path).notes() == []
    config.cluster.expert_gpus = [1, 2]  # a GPU each
    (tmp_path / "no-mps").rmdir()
    assert local.LocalCluster(config, tmp_path).notes() == []


def test_lockstep_backends_and_the_devices_they_link():
    from expertmesh.config import Config, ConfigError
    config = Config()
    for device in ("cpu", "cuda"):  # UCX links carry host memory and device memory alike
        config.model.device, config.transport.backend = device, "ucx-lockstep"
        config.validate()
    config.transport.backend = "gloo"
    with pytest.raises(ConfigError, match="gloo links CPU processes, not model.device=cuda"):
        config.validate()
    config.transport.backend = "ucx_lockstep"
    with pytest.raises(ConfigError, match="'ucx_lockstep'; choose .* gloo, ucx-lockstep or lockstep"):
        config.validate()
