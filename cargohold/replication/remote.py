"""`RemoteContent` over gRPC peers: how the HTTP API serves blobs this node does not hold."""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import AsyncIterator, Callable

import anyio

from cargohold.blobs.remote import ContentUnavailable
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.oci.reference import Digest, parse_digest
from cargohold.replication.sources import Holders, cluster_view
from cargohold.replication.transfer import PeerClient, PeerUnavailable

log = logging.getLogger("cargohold.replication")


class PeerContent:
    """Reads from the nearest live holder, resuming with the next one when a stream drops."""

    def __init__(self, metadata: ClusterMetadata, peers: PeerClient, holders: Holders):
        self.metadata = metadata
        self.peers = peers
        self.holders = holders
        self.remote_reads = 0

    async def can_read(self, digest: str) -> bool:
        return bool(await self.holders.confirmed(digest))

    async def read(self, digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """Part of a blob, chunk by chunk (never the whole blob in memory). A holder that fails
        or ends short is followed by the next one from where it stopped; ContentUnavailable when
        none can deliver (before the first byte: the API then answers 503)."""
        self.remote_reads += 1
        position, end = offset, offset + length
        if length <= 0:
            return          # nothing to read (a peer would take length 0 for "to the end")
        async with aclosing(self.holders.in_turn(digest, lambda: position > offset)) as sources:
            async for source in sources:
                try:
                    async with aclosing(self.peers.read(source.grpc, digest, position, end - position)) as chunks:
                        async for data in chunks:
                            position += len(data)
                            yield data
                except PeerUnavailable as exc:
                    log.info("remote read of %s from %s interrupted at %d: %s; resuming",
                             digest, source.node_id, position, exc)
                if position >= end:
                    return

    async def read_all(self, digest: str, size: int) -> bytes:
        data = b"".join([chunk async for chunk in self.read(digest, 0, size)])
        expected = parse_digest(digest)
        if await anyio.to_thread.run_sync(Digest.of, data, expected.algorithm) != expected:
            raise ContentUnavailable(f"a peer served corrupt content for {digest}")
        return data

    async def wait_for_copies(self, digest: str, copies: int, timeout: float) -> bool:
        return await self._wait_until(digest, lambda: len(self.metadata.holders(digest)) >= copies, timeout)

    async def wait_for_sites(self, digest: str, other_sites: int, timeout: float) -> bool:
        view = cluster_view(self.metadata, self.holders.settings)
        state = self.metadata.blob_states().get(digest)
        targets = view.target_sites(state.repos if state is not None else ())
        other_sites = min(other_sites, len(targets - {view.site}))

        def satisfied() -> bool:
            held_in = cluster_view(self.metadata, self.holders.settings).sites_of(self.metadata.holders(digest))
            return len(held_in - {view.site}) >= other_sites

        return await self._wait_until(digest, satisfied, timeout)

    async def _wait_until(self, digest: str, satisfied: Callable[[], bool], timeout: float) -> bool:
        if satisfied():
            return True
        with self.metadata.changes(lambda blobs, _sections: digest in blobs and satisfied()) as done:
            await done.wait(timeout)
        return satisfied()
