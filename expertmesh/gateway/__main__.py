"""Entry point of the gateway process: `python -m expertmesh.gateway --config C`."""
from __future__ import annotations

from pathlib import Path

import uvicorn

from ..config import Config
from ..model.spec import ModelSpec
from ..process import run_node
from ..transport.zmq import ZmqTransport
from .app import ServedModel, create_app
from .nodes import AttentionNodeClient, NodeLink
from .text import TextCodec


async def main(config: Config, index: int) -> None:
    spec = ModelSpec.from_dir(config.model.path)
    transport = ZmqTransport()
    nodes = [AttentionNodeClient(i, await transport.connect(address), config.gateway.node_timeout_s)
             for i, address in enumerate(config.cluster.attention_addresses)]
    served = ServedModel(name=config.gateway.model_name or Path(config.model.path).resolve().name,
                         vocab_size=spec.vocab_size, max_model_len=config.engine.context_len(spec),
                         codec=TextCodec(config.model.path), nodes=nodes,
                         expert_nodes=[NodeLink(f"expert node {i}", await transport.connect(address),
                                                config.gateway.node_timeout_s)
                                       for i, address in enumerate(config.cluster.expert_control_addresses)])
    server = uvicorn.Server(uvicorn.Config(create_app(served), host=config.gateway.host, port=config.gateway.port,
                                           log_level="warning", lifespan="on"))
    server.install_signal_handlers = lambda: None  # run_node owns SIGTERM/SIGINT
    await server.serve()


if __name__ == "__main__":
    run_node("gateway", main)
