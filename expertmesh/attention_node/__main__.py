"""Entry point of an attention node process: `python -m expertmesh.attention_node --config C --index I`."""
from __future__ import annotations

import logging

import torch

from ..config import Config
from ..model.spec import ModelSpec
from ..model.weights import load_attention_side
from ..placement.plan import load_cluster_placement, load_cluster_topology
from ..process import run_node
from ..transport.base import connect_within, make_transport
from ..transport.emulation import emulate
from ..transport.m2n import M2NClient
from ..transport.zmq import ZmqTransport
from .kv_cache import KVCache
from .model_runner import ModelRunner
from .node import AttentionNode
from .scheduler import Scheduler

log = logging.getLogger("attention_node")


async def main(config: Config, index: int) -> None:
    spec = ModelSpec.from_dir(config.model.path)
    placement = load_cluster_placement(config, spec)
    dtype, device = config.model.torch_dtype, config.node_device("attention", index)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    weights = load_attention_side(config.model.path, spec, dtype, device)
    kv_cache = KVCache(spec, config.engine.max_num_seqs, config.engine.context_len(spec), dtype, device)
    transport = make_transport(config.transport.backend, device, config.transport.ucx_progress_mode)
    t = config.transport
    connections = [emulate(await connect_within(transport, address, t.connect_timeout_s), t.emulated_latency_us,
                           t.emulated_bandwidth_gbps) for address in config.cluster.expert_addresses]
    topology = load_cluster_topology(config)
    m2n = M2NClient(connections, placement, index, config.transport.recv_timeout_s, device,
                    attention_domain=topology.attention_domain[index] if topology else 0,
                    expert_domain=topology.expert_domain if topology else None,
                    load_bound=topology.load_bound if topology else None)
    await m2n.handshake(spec.num_layers, spec.num_experts, config.transport.connect_timeout_s)
    control = await ZmqTransport().listen(config.cluster.attention_addresses[index])
    log.info("connected to %d expert nodes; serving on %s", len(connections), config.cluster.attention_addresses[index])
    runner = ModelRunner(spec, weights, kv_cache, m2n, device)
    node = AttentionNode(index, config, spec, runner, Scheduler(kv_cache, config.engine.max_batch_tokens,
                                                                spec.eos_token_ids), m2n, control)
    try:
        await node.serve()
    finally:
        await m2n.close()
        await control.close()


if __name__ == "__main__":
    run_node("attention_node", main)
