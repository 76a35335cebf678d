"""Who may talk to a node: peers that presented the cluster's secret (a `Credentials` message, first on their
connection). The launcher makes one secret per cluster, so a stranger who reaches a port can neither inject a
Dispatch or a request nor read activations; what such a peer sends is dropped with a logged warning, and the node
keeps serving. No secret configured (tests, a trusted network): everyone is admitted."""
from __future__ import annotations

import hmac
import logging

from .base import PeerId
from .protocol import Credentials, Message

log = logging.getLogger(__name__)


class PeerGate:
    def __init__(self, secret: str | None, where: str) -> None:
        self.secret = secret
        self.where = where  # for the log: which node and listener
        self._admitted: set[PeerId] = set()
        self._refused = 0

    def admits(self, peer: PeerId, message: Message) -> bool:
        """Whether `message` from `peer` is to be handled; Credentials are consumed here."""
        if isinstance(message, Credentials):
            if self.secret is None or hmac.compare_digest(message.secret.encode(), self.secret.encode()):
                self._admitted.add(peer)
            else:
                log.warning("%s: a peer presented a wrong cluster secret; what it sends is dropped", self.where)
            return False
        if self.secret is None or peer in self._admitted:
            return True
        self._refused += 1
        if self._refused in (1, 10, 100) or self._refused % 1000 == 0:  # a log line, not a flood
            log.warning("%s: dropped %s from a peer without the cluster secret (%d so far)", self.where,
                        type(message).__name__, self._refused)
        return False
