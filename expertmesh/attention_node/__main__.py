"""Entry point of an attention node process: `python -m expertmesh.attention_node --config C --index I`."""
from __future__ import annotations

import logging

import torch

from ..config import LOCKSTEP_BACKENDS, Config
from ..kv.block_manager import BlockManager
from ..kv.cache import PagedKVCache, num_blocks_for
from ..model.spec import ModelSpec
from ..m2n.links import make_links
from ..m2n.lockstep import LockstepClient
from ..model.weights import load_attention_side, load_experts
from ..placement.plan import load_cluster_placement, load_cluster_topology
from ..planner.gpus import check_node_gpu
from ..process import before_cuda_starts, run_node
from ..transport.base import Connection, connect_within, make_transport
from ..transport.emulation import emulate
from ..transport.protocol import Credentials
from ..m2n.messages import M2NClient
from ..transport.zmq import ZmqTransport
from .model_runner import ModelRunner
from .node import AttentionNode
from .scheduler import Scheduler

log = logging.getLogger("attention_node")


async def main(config: Config, index: int) -> None:
    spec = ModelSpec.from_dir(config.model.path)
    dtype, device = config.model.torch_dtype, config.node_device("attention", index)
    before_cuda_starts(config, "attention", index)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    check_node_gpu(config.cluster.attention_gpu_type, "attention", index, device,
                   torch.cuda.get_device_name(device) if device.startswith("cuda") else None)
    engine = config.engine
    weights = load_attention_side(config.model.path, spec, dtype, device)
    m2n, local_experts = None, None
    if config.cluster.expert_nodes == 0:  # colocated: every expert here, no transport
        local_experts = load_experts(config.model.path, spec, [(layer, e) for layer in spec.moe_layer_ids
                                                                for e in range(spec.num_experts)], dtype, device)
        log.info("colocated: all experts of %d MoE layers held here", len(local_experts))
    else:
        m2n = await connect_expert_nodes(config, spec, index, device)
    kv_cache = PagedKVCache(spec, num_blocks_for(engine, spec, dtype, device), engine.block_size, dtype, device)
    log.info("KV cache: %d blocks of %d tokens", kv_cache.num_blocks, kv_cache.block_size)
    blocks = BlockManager(kv_cache.num_blocks, kv_cache.block_size)
    runner = ModelRunner(spec, weights, kv_cache, m2n, device, local_experts, context_len=engine.context_len(spec),
                         blocks=blocks)
    if device.startswith("cuda"):
        await runner.warm_up(engine.max_batch_tokens)
        if not engine.enforce_eager:
            runner.capture_graphs(engine.max_num_seqs, engine.microbatches, engine.graph_prefill_limit())
    control = await ZmqTransport().listen(config.cluster.attention_addresses[index])
    log.info("serving on %s", config.cluster.attention_addresses[index])
    scheduler = Scheduler(blocks, engine.max_num_seqs,
                          engine.max_batch_tokens, engine.context_len(spec), spec.eos_token_ids,
                          max_waiting_steps=engine.max_waiting_steps)
    node = AttentionNode(index, config, spec, runner, scheduler, m2n, control)
    try:
        await node.serve()
    finally:
        if m2n is not None:
            await m2n.close()
        await control.close()


async def connect_expert_nodes(config: Config, spec: ModelSpec, index: int,
                               device: str) -> M2NClient | LockstepClient:
    placement = load_cluster_placement(config, spec)
    if config.transport.backend in LOCKSTEP_BACKENDS:
        return await connect_lockstep(config, spec, placement, index, device)
    transport = make_transport(config.transport.backend, device, config.transport.ucx_progress_mode)
    t = config.transport

    async def connect(node: int) -> Connection:
        """A link to expert node `node`, credentials presented: at start, and again when the node was lost."""
        conn = emulate(await connect_within(transport, config.cluster.expert_addresses[node], t.connect_timeout_s),
                       t.emulated_latency_us, t.emulated_bandwidth_gbps)
        await present_credentials(config, [conn])
        return conn

    connections = [await connect(node) for node in range(config.cluster.expert_nodes)]
    topology = load_cluster_topology(config)
    m2n = M2NClient(connections, placement, index, config.transport.recv_timeout_s, device,
                    attention_domain=topology.attention_domain[index] if topology else 0,
                    expert_domain=topology.expert_domain if topology else None,
                    load_bound=topology.load_bound if topology else None, connect=connect)
    await m2n.handshake(spec.num_layers, spec.num_experts, config.transport.connect_timeout_s)
    log.info("connected to %d expert nodes", len(connections))
    return m2n


async def connect_lockstep(config: Config, spec: ModelSpec, placement, index: int, device: str) -> LockstepClient:
    """The lockstep M2N: sets up the links (nccl/gloo: joins the cluster's world), then greets the expert nodes over
    zmq (ipc: exchanging receive-region handles; ucx-lockstep: UCX worker addresses)."""
    links = make_links(config, "attention", index, device, spec.hidden_size, config.model.torch_dtype, spec.top_k)
    t = config.transport
    connections = [await connect_within(ZmqTransport(), address, t.connect_timeout_s)
                   for address in config.cluster.expert_addresses]
    await present_credentials(config, connections)
    topology = load_cluster_topology(config)
    m2n = LockstepClient(connections, links, placement, index, config.engine.max_batch_tokens, spec.hidden_size,
                         config.model.torch_dtype, config.engine.microbatches, device, t.recv_timeout_s,
                         attention_domain=topology.attention_domain[index] if topology else 0,
                         expert_domain=topology.expert_domain if topology else None)
    await m2n.handshake(spec.num_layers, spec.num_experts, t.connect_timeout_s)
    log.info("lockstep M2N over %s to %d expert nodes", links.backend, len(connections))
    return m2n


async def present_credentials(config: Config, connections: list) -> None:
    """The cluster's secret, first on each connection to an expert node (transport/peers.py)."""
    if config.cluster.secret is not None:
        for conn in connections:
            await conn.send(Credentials(config.cluster.secret))


if __name__ == "__main__":
    run_node("attention_node", main)
