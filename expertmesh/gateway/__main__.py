"""Entry point of the gateway process: `python -m expertmesh.gateway --config C`."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
from pathlib import Path

import uvicorn

from ..config import Config, ConfigError
from ..placement.plan import load_cluster_topology
from ..model.spec import ModelSpec
from ..process import run_node
from ..transport.zmq import ZmqTransport
from .app import ServedModel, create_app
from .nodes import AttentionNodeClient, NodeLink
from .router import RoutingPolicy
from .text import TextCodec

log = logging.getLogger(__name__)


def routing_policy(config: Config) -> RoutingPolicy:
    """Rebatching by predicted domain when a predictor and a topology are configured; else least loaded."""
    topology = load_cluster_topology(config)
    if config.gateway.predictor is None:
        return RoutingPolicy()
    if topology is None:
        raise ConfigError("gateway.predictor needs cluster.topology: the domains of the attention nodes")
    from ..placement.predictor import DomainPredictor
    predictor = DomainPredictor.load(config.gateway.predictor)
    if predictor.num_domains != topology.num_domains:
        raise ConfigError(f"predictor {config.gateway.predictor!r} knows {predictor.num_domains} domains, "
                          f"topology has {topology.num_domains}")
    share = [topology.expert_domain.count(d) / topology.expert_nodes for d in range(topology.num_domains)]
    return RoutingPolicy(predictor, topology.attention_domain, topology.attention_load_bound, domain_share=share)


def served_model_names(config: Config) -> list[str]:
    """The ids a request's `model` may be, the one /v1/models shows first: --served-model-name's names, else the
    model directory's name, then --model as given (vLLM's default id: `models/expertmesh-mini`, an absolute path)."""
    if config.gateway.served_model_names:
        return list(dict.fromkeys(config.gateway.served_model_names))
    given = config.model.path
    return list(dict.fromkeys([Path(given).resolve().name, given, os.path.normpath(given)]))


def server_config(app, config: Config) -> "uvicorn.Config":
    """uvicorn's settings: httptools parses and writes HTTP (h11, its pure-Python parser, cost the gateway 14% more CPU
    per streamed token); h11 with a warning where httptools, a dependency, is missing."""
    http = "httptools"
    if importlib.util.find_spec("httptools") is None:
        log.warning("httptools is not installed: HTTP through h11, at more CPU per streamed token")
        http = "h11"
    return uvicorn.Config(app, host=config.gateway.host, port=config.gateway.port, http=http, log_level="warning",
                          lifespan="on")


def shared_socket(config: Config) -> socket.socket:
    """The HTTP port, bound with SO_REUSEPORT so that every gateway worker listens on it and the kernel spreads the
    connections over them."""
    sock = socket.socket(socket.AF_INET6 if ":" in config.gateway.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((config.gateway.host, config.gateway.port))
    return sock


async def main(config: Config, index: int) -> None:
    workers = config.gateway.workers  # gateway processes on the one port, this one of them `index`
    spec = ModelSpec.from_dir(config.model.path)
    transport = ZmqTransport()
    secret = config.cluster.secret
    nodes = [AttentionNodeClient(i, await transport.connect(address), config.gateway.node_timeout_s, secret)
             for i, address in enumerate(config.cluster.attention_addresses)]
    name, *aliases = served_model_names(config)
    served = ServedModel(name=name, aliases=tuple(aliases),
                         vocab_size=spec.vocab_size, max_model_len=config.engine.context_len(spec),
                         codec=TextCodec(config.model.path), nodes=nodes,
                         expert_nodes=[NodeLink(f"expert node {i}", await transport.connect(address),
                                                config.gateway.node_timeout_s, secret)
                                       for i, address in enumerate(config.cluster.expert_control_addresses)],
                         routing=routing_policy(config), api_key=config.gateway.api_key,
                         max_pending_requests=-(-config.gateway.max_pending_requests // workers),
                         max_pending_tokens=-(-config.gateway.max_pending_tokens // workers),
                         node_wait_s=config.gateway.node_wait_s, request_timeout_s=config.gateway.request_timeout_s,
                         worker=index, stream_interval=config.gateway.stream_interval)
    server = uvicorn.Server(server_config(create_app(served), config))
    server.install_signal_handlers = lambda: None  # run_node owns SIGTERM/SIGINT
    serving = asyncio.ensure_future(server.serve(sockets=[shared_socket(config)] if workers > 1 else None))
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:  # SIGTERM: let uvicorn shut down itself (a cancelled lifespan logs a traceback)
        server.should_exit = True
        await serving
        raise


if __name__ == "__main__":
    run_node("gateway", main)
