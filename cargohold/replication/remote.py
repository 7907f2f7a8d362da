"""`RemoteContent` over gRPC peers: how the HTTP API serves blobs this node does not hold."""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import AsyncIterator, Callable

import anyio

from cargohold.blobs.remote import ContentUnavailable, FollowedFill
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.oci.reference import Digest, parse_digest
from cargohold.replication.sources import Holders, cluster_view
from cargohold.replication.transfer import FillNotFollowed, FollowedCall, PeerClient, PeerUnavailable

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

    async def follow_fill(self, node_id: str, digest: str) -> FollowedFill | None:
        address = self._grpc_address(node_id)
        if address is None:
            return None
        try:
            call = await self.peers.follow_fill(address, digest)
        except FillNotFollowed:
            return None
        except PeerUnavailable as exc:
            log.info("cannot follow the fill of %s on node %s: %s", digest, node_id, exc)
            return None
        return PeerFill(self, node_id, address, digest, call)

    def _grpc_address(self, node_id: str) -> str | None:
        member = self.metadata.members().get(node_id)
        if member is None or node_id not in self.metadata.alive():
            return None
        return member.grpc

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


class PeerFill:
    """A fill on another node. The call that brought its size goes on with the bytes from 0 (so
    a follower admitted once keeps its place on the filling node); a read from elsewhere, or a
    second one, is a new call. A new call refused because the fill has ended reads the published
    blob from its holders instead."""

    def __init__(self, content: PeerContent, node_id: str, address: str, digest: str, call: FollowedCall):
        self.size = call.size
        self._content = content
        self._node_id = node_id
        self._address = address
        self._digest = digest
        self._call: FollowedCall | None = call

    async def read(self, start: int, length: int) -> AsyncIterator[bytes]:
        position, end = start, start + length
        if length <= 0:
            return
        try:
            call = await self._call_from(start)
        except FillNotFollowed as exc:
            log.info("the fill of %s on node %s ended before this read (%s): reading the published blob",
                     self._digest, self._node_id, exc)
            async with aclosing(self._content.read(self._digest, start, length)) as chunks:
                async for data in chunks:
                    yield data
            return
        except PeerUnavailable as exc:
            raise self._broken(position, exc) from None
        try:
            async with aclosing(call.chunks()) as chunks:
                async for data in chunks:
                    data = data[:end - position]
                    position += len(data)
                    yield data
                    if position >= end:
                        return
        except PeerUnavailable as exc:
            raise self._broken(position, exc) from None
        raise ContentUnavailable(f"the fill of {self._digest} on node {self._node_id} ended at byte {position} "
                                 f"of {end}")

    async def _call_from(self, start: int) -> FollowedCall:
        call, self._call = self._call, None
        if call is not None and start == 0:
            return call
        if call is not None:
            call.cancel()
        return await self._content.peers.follow_fill(self._address, self._digest, start)

    def _broken(self, position: int, exc: Exception) -> ContentUnavailable:
        return ContentUnavailable(f"the fill of {self._digest} on node {self._node_id} broke off at byte "
                                  f"{position}: {exc}")
