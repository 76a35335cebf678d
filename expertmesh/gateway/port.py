"""The gateway's HTTP port when several gateway processes serve it: one listening socket, made by the launcher and
inherited by each of them."""
from __future__ import annotations

import os
import socket

from ..config import Config

# The launcher's listening socket, inherited by every gateway process (its file descriptor number).
LISTEN_FD_ENV = "EXPERTMESH_GATEWAY_FD"


def listening_socket(config: Config) -> socket.socket:
    """The HTTP port, bound and listening, for the launcher to hand to each of several gateway processes.

    One socket that all of them accept from, not one each bound with SO_REUSEPORT: the kernel hashes SO_REUSEPORT
    connections over the sockets blind to load, so one gateway ran at 99% of a core while another ran at 75%
    (RESULTS.md, thirteenth session); on one shared socket the process that is idle in its event loop accepts
    first (how gunicorn's and uvicorn's workers share a port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in config.gateway.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.gateway.host, config.gateway.port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def inherited_socket() -> socket.socket | None:
    fd = os.environ.get(LISTEN_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None
