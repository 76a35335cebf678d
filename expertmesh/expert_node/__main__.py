"""Entry point of an expert node process: `python -m expertmesh.expert_node --config C --index I`."""
from __future__ import annotations

import logging
import time

import torch

from ..config import LOCKSTEP_BACKENDS, Config
from ..cuda_graph import prefill_graph_limit, step_graph_shapes
from ..m2n.links import make_links
from ..model.spec import ModelSpec
from ..model.weights import load_experts
from ..placement.plan import load_cluster_placement
from ..planner.gpus import check_node_gpu
from ..process import before_cuda_starts, run_node
from ..transport.base import make_transport
from ..transport.zmq import ZmqTransport
from .lockstep import LockstepRounds
from .node import ExpertNode

log = logging.getLogger("expert_node")


async def main(config: Config, index: int) -> None:
    spec = ModelSpec.from_dir(config.model.path)
    placement = load_cluster_placement(config, spec)
    pairs = placement.pairs_on(index)
    device = config.node_device("expert", index)
    before_cuda_starts(config, "expert", index)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    check_node_gpu(config.cluster.expert_gpu_type, "expert", index, device,
                   torch.cuda.get_device_name(device) if device.startswith("cuda") else None)
    experts = load_experts(config.model.path, spec, pairs, config.model.torch_dtype, device)
    lockstep = config.transport.backend in LOCKSTEP_BACKENDS
    # lockstep: the listener carries only handshakes and step plans (zmq); the rounds travel on the links
    transport = ZmqTransport() if lockstep else make_transport(config.transport.backend, device,
                                                                 config.transport.ucx_progress_mode)
    node = ExpertNode(index, experts, spec.num_experts, None, None, secret=config.cluster.secret)
    if lockstep:
        links = make_links(config, "expert", index, device, spec.hidden_size, config.model.torch_dtype, spec.top_k)
        # ipc links keep their counts on the device: whole steps are captured (StepGraphs' counterpart)
        whole_steps = links.backend == "ipc" and not config.engine.enforce_eager
        engine = config.engine
        node.rounds = LockstepRounds(links, spec.moe_layer_ids, engine.max_batch_tokens, spec.hidden_size,
                                     spec.top_k, config.model.torch_dtype, device, node.compute_lane,
                                     config.transport.recv_timeout_s, node.compute_eager if whole_steps else None,
                                     engine.max_num_seqs, lambda n: node.warm_up(n, spec.top_k),
                                     step_graph_shapes(engine.max_num_seqs, engine.microbatches,
                                                       prefill_graph_limit(engine.graph_prefill_limit(), spec)))
        log.info("lockstep rounds over %s", links.backend)
    if device.startswith("cuda"):  # every kernel variant a round may need, compiled and loaded before the first:
        # else the first requests wait for Triton (the cold first row of every served sweep), and on NCCL links a
        # first load waits for the device to drain while rounds are in flight
        started = time.monotonic()
        sizes = node.warm_up_all(config.engine.max_batch_tokens, spec.top_k)
        torch.cuda.synchronize(device)
        log.info("warmed up %d sizes up to %d tokens in %.1f s", len(sizes), sizes[-1], time.monotonic() - started)
    if device.startswith("cuda") and not config.engine.enforce_eager:
        if lockstep:  # a lane per attention node; a decode round brings one attention node's batch
            node.capture_graphs(spec.top_k, config.engine.max_num_seqs, lanes=config.cluster.attention_nodes)
        else:  # a decode round brings at most every attention node's whole batch
            node.capture_graphs(spec.top_k, config.cluster.attention_nodes * config.engine.max_num_seqs)
    # listening only now: graph capture holds the event loop for seconds, in which a peer's connection handshake
    # (UCX's peer-info exchange) would time out and log an error
    node.listener = listener = await transport.listen(config.cluster.expert_addresses[index])
    node.control = control = await ZmqTransport().listen(config.cluster.expert_control_addresses[index])
    log.info("holds %d experts over %d layers; listening on %s", len(pairs), len(spec.moe_layer_ids),
             config.cluster.expert_addresses[index])
    try:
        await node.serve()
    finally:
        await listener.close()
        await control.close()
        if node.rounds is not None:
            node.rounds.links.close()


if __name__ == "__main__":
    run_node("expert_node", main)
