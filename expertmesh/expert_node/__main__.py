"""Entry point of an expert node process: `python -m expertmesh.expert_node --config C --index I`."""
from __future__ import annotations

import logging

import torch

from ..config import Config
from ..model.spec import ModelSpec
from ..model.weights import load_experts
from ..placement.plan import load_cluster_placement
from ..process import run_node
from ..transport.base import make_transport
from ..transport.zmq import ZmqTransport
from .node import ExpertNode

log = logging.getLogger("expert_node")


async def main(config: Config, index: int) -> None:
    spec = ModelSpec.from_dir(config.model.path)
    placement = load_cluster_placement(config, spec)
    pairs = placement.pairs_on(index)
    device = config.node_device("expert", index)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    experts = load_experts(config.model.path, spec, pairs, config.model.torch_dtype, device)
    transport = make_transport(config.transport.backend, device, config.transport.ucx_progress_mode)
    listener = await transport.listen(config.cluster.expert_addresses[index])
    log.info("holds %d experts over %d layers; listening on %s", len(pairs), len(spec.moe_layer_ids),
             config.cluster.expert_addresses[index])
    control = await ZmqTransport().listen(config.cluster.expert_control_addresses[index])
    node = ExpertNode(index, experts, spec.num_experts, listener, control)
    if device.startswith("cuda") and not config.engine.enforce_eager:
        # a decode round brings at most every attention node's whole batch
        node.capture_graphs(spec.top_k, config.cluster.attention_nodes * config.engine.max_num_seqs)
    try:
        await node.serve()
    finally:
        await listener.close()
        await control.close()


if __name__ == "__main__":
    run_node("expert_node", main)
