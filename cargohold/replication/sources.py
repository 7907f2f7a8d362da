"""This node's replication settings, the cluster picture `plan` decides on (taken from the
read model), and the holders to read a blob from, for fetches and remote reads alike."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Mapping

import anyio

from cargohold.blobs.remote import ContentUnavailable
from cargohold.coordinator.metadata import ClusterMetadata, Member
from cargohold.replication.plan import ClusterView, Liveness

FETCH_ATTEMPTS = 6
RETRY_DELAY = 0.5


@dataclass(frozen=True)
class ReplicationSettings:
    """One node's replication settings (the `replication` part of the node's configuration)."""
    node_id: str
    site: str
    replicas_per_site: int = 2
    down_after: float = 300.0
    workers: int = 8
    per_peer_streams: int = 4
    site_bandwidth: Mapping[str, float] = field(default_factory=dict)   # site -> bytes/s
    storage_limit: int | None = None
    disk_reserve: int = 256 * 1024 * 1024


def cluster_view(metadata: ClusterMetadata, settings: ReplicationSettings,
                 liveness: Liveness | None = None) -> ClusterView:
    """The picture `plan` decides on, taken from the read model now."""
    return ClusterView(settings.node_id, settings.site, settings.replicas_per_site, metadata.members(),
                       frozenset(metadata.alive()), metadata.replication_rules(),
                       dead_since=dict(liveness.dead_since) if liveness else {}, now=time.monotonic(),
                       down_after=settings.down_after)


class Holders:
    """Live holders of a blob, nearest first."""

    def __init__(self, metadata: ClusterMetadata, settings: ReplicationSettings):
        self.metadata = metadata
        self.settings = settings

    def live(self, digest: str) -> list[Member]:
        """From the read model only (placement decisions, which the watch wakes again)."""
        return cluster_view(self.metadata, self.settings).sources(digest, self.metadata.holders(digest))

    async def confirmed(self, digest: str) -> list[Member]:
        """Like `live`, but a read model that knows of no holder is checked against etcd: a
        blob another node just acknowledged is readable here at once (read your writes)."""
        sources = self.live(digest)
        if sources:
            return sources
        holders = await self.metadata.holders_confirmed(digest)
        return cluster_view(self.metadata, self.settings).sources(digest, holders)

    async def in_turn(self, digest: str, started: Callable[[], bool]) -> AsyncIterator[Member]:
        """The live holders, nearest first, round after round with a growing pause in between,
        until the caller has what it needs and stops iterating. ContentUnavailable when no live
        node holds it before anything was read (`started()` false), or after FETCH_ATTEMPTS rounds."""
        for attempt in range(FETCH_ATTEMPTS):
            sources = await self.confirmed(digest)
            if not sources and not started():
                raise ContentUnavailable(f"no live node holds {digest}")
            for source in sources:
                yield source
            await anyio.sleep(RETRY_DELAY * (attempt + 1))
        raise ContentUnavailable(f"{digest}: could not read from any holder")
