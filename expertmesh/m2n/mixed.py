"""Links of several backends at once (`transport.backend=lockstep`): each peer's link is the backend link_plan.py
chose for it, and every call goes to the links of its peer's backend.

The protocol is each backend's own, unchanged: one receive slot per (peer, microbatch) of fixed capacity, a clear
error for a message that does not fit, a TransportError for a dead peer. What a send or receive returns to wait on
is tagged with its backend's links, and a wait waits on each backend for its own."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..transport.protocol import TensorMeta
from .link_plan import DIST_BACKENDS, LinkPlan
from .links import Links, links_over

if TYPE_CHECKING:
    from ..config import Config


class MixedLinks(Links):
    def __init__(self, attention_nodes: int, microbatches: int, slot_bytes: int, links_of: dict[int, Links],
                 idle: Sequence[Links] = ()) -> None:
        """links_of: peer rank -> the links that reach it; idle: links that reach no peer of this node but must
        live as long as it does (the torch.distributed world, which every node joins)."""
        super().__init__(attention_nodes, microbatches, slot_bytes)
        self._links_of = links_of
        self._all = list({id(links): links for links in [*links_of.values(), *idle]}.values())
        used = list({id(links): links for links in links_of.values()}.values())
        self.backend = "+".join(sorted({links.backend for links in used}))  # e.g. "gloo+ucx"
        self.device_ordered = all(links.device_ordered for links in used)
        self.receives_hold_device = any(links.receives_hold_device for links in used)

    def _links(self, peer: int) -> Links:
        links = self._links_of.get(peer)
        if links is None:
            raise RuntimeError(f"no link to rank {peer}: its links reach ranks {sorted(self._links_of)}")
        return links

    def send(self, microbatch: int, peer: int, tensors: Sequence[torch.Tensor]) -> list:
        links = self._links(peer)
        return [(links, work) for work in links.send(microbatch, peer, tensors)]

    def receive(self, microbatch: int, peer: int, metas: Sequence[TensorMeta]) -> tuple[list[torch.Tensor], list]:
        links = self._links(peer)
        views, works = links.receive(microbatch, peer, metas)
        return views, [(links, work) for work in works]

    def flush(self) -> None:
        for links in self._all:
            links.flush()

    def _by_links(self, works: list) -> list[tuple[Links, list]]:
        grouped: dict[int, tuple[Links, list]] = {}
        for links, work in works:
            grouped.setdefault(id(links), (links, []))[1].append(work)
        return list(grouped.values())

    async def wait(self, works: list) -> None:
        self.flush()  # what any backend holds back starts now, as a wait of one backend flushes its own
        for links, its_works in self._by_links(works):  # each bounded by its own timeout
            await links.wait(its_works)

    def enqueue_wait(self, works: list) -> None:
        for links, its_works in self._by_links(works):
            links.enqueue_wait(its_works)

    def region_handle(self, peer: int) -> bytes:
        return self._links(peer).region_handle(peer)

    def attach(self, peer: int, handle: bytes) -> None:
        self._links(peer).attach(peer, handle)

    def progress(self) -> str:
        return "; ".join(p for p in (links.progress() for links in self._all) if p)

    def release(self) -> None:
        for links in self._all:
            links.release()

    def close(self) -> None:
        for links in self._all:
            links.close()


def make_mixed_links(config: "Config", plan: LinkPlan, rank: int, peers: list[int], device: str,
                     slot_bytes: int) -> Links:
    """The links of the node of `rank` under plan: one backend's links per backend its peers take (that backend's
    alone when there is one and no world to join besides)."""
    cluster, engine, t = config.cluster, config.engine, config.transport
    peers_of: dict[str, list[int]] = {}
    for peer in peers:
        peers_of.setdefault(plan.between(rank, peer), []).append(peer)
    made = {backend: links_over(config, backend, rank, its_peers, device, slot_bytes)
            for backend, its_peers in peers_of.items() if backend not in DIST_BACKENDS}
    world = sorted({backend for backend in plan.backends.values() if backend in DIST_BACKENDS})
    if len(world) > 1:
        raise ValueError(f"links over {' and '.join(world)} at once: one torch.distributed world has one backend")
    idle = []
    if world:  # every node joins, linked over it or not: torch makes a world's groups on every rank
        from ..config import ConfigError
        from .dist import init_links
        if not cluster.dist_address:
            raise ConfigError(f"{world[0]} links need cluster.dist_address (the launcher sets one)")
        linked = {a: [e for e in range(cluster.expert_nodes) if plan.backends[(a, e)] == world[0]]
                  for a in range(cluster.attention_nodes)}
        links = init_links(world[0], cluster.dist_address, cluster.attention_nodes, cluster.expert_nodes, rank,
                           engine.microbatches, device, t.connect_timeout_s, t.recv_timeout_s, slot_bytes, linked)
        if world[0] in peers_of:
            made[world[0]] = links
        else:
            idle.append(links)
    if len(made) == 1 and not idle:
        return next(iter(made.values()))
    links_of = {peer: made[backend] for backend, its_peers in peers_of.items() for peer in its_peers}
    return MixedLinks(cluster.attention_nodes, engine.microbatches, slot_bytes, links_of, idle)
