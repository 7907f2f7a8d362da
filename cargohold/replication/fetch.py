"""Copying blobs from peers into the local store: one blob (resuming after drops) or a group
of small ones in one stream. Bytes are verified against the digest before the store takes them."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from contextlib import aclosing

import anyio

from cargohold.blobs.remote import ContentUnavailable
from cargohold.blobs.store import FilesystemBlobStore, StagingWriter
from cargohold.coordinator.metadata import Member
from cargohold.oci.reference import parse_digest
from cargohold.runtime.grpc_bridge import StreamStopped
from cargohold.runtime.pacing import TokenAccount
from cargohold.replication.sources import Holders, ReplicationSettings
from cargohold.replication.transfer import PeerClient, PeerUnavailable

log = logging.getLogger("cargohold.replication")


class TokenBucket:
    """A bandwidth limit: `rate` bytes per second, bursts of up to one second's worth.

    Taken from the worker threads that consume fetch streams (several at once), so it is
    thread-safe and its wait is a blocking one, cut short by the fetch's `stopping` event."""

    def __init__(self, rate: float):
        self._account = TokenAccount(rate, rate)
        self._lock = threading.Lock()

    def take(self, amount: int, stopping: threading.Event) -> None:
        with self._lock:
            wait = self._account.debit(amount)
        if wait > 0 and stopping.wait(wait):
            raise StreamStopped()


class Fetcher:
    """Fetches with a per-peer stream limit and, across sites, a per-site bandwidth limit."""

    def __init__(self, store: FilesystemBlobStore, peers: PeerClient, holders: Holders,
                 settings: ReplicationSettings):
        self.store = store
        self.peers = peers
        self.holders = holders
        self.settings = settings
        self.bytes_fetched = 0
        self._peer_limiters: dict[str, anyio.CapacityLimiter] = {}
        self._buckets = {site: TokenBucket(rate) for site, rate in settings.site_bandwidth.items()}

    def _peer_limiter(self, node_id: str) -> anyio.CapacityLimiter:
        limiter = self._peer_limiters.get(node_id)
        if limiter is None:
            limiter = self._peer_limiters[node_id] = anyio.CapacityLimiter(self.settings.per_peer_streams)
        return limiter

    def _bucket(self, source: Member) -> TokenBucket | None:
        """The bandwidth limit for fetches from `source`'s site (none within our own site)."""
        return self._buckets.get(source.site) if source.site != self.settings.site else None

    async def fetch(self, digest: str, size: int) -> None:
        """Copy a blob from a holder into the local store, verified. Resumes after drops.

        A holder's whole stream is consumed in one worker thread, which also writes, hashes and
        (for another site) waits for the bandwidth limit, chunk by chunk: one hop off the event
        loop per stream instead of two per chunk. A dropped stream goes on from the reached
        offset with the next holder; the digest is checked before the store ingests the file
        (which fsyncs it, once)."""
        parsed = parse_digest(digest)
        download = _Download(self.store.staging_path(), hashlib.new(parsed.algorithm), size)
        try:
            async with aclosing(self.holders.in_turn(digest, lambda: download.position > 0)) as sources:
                async for source in sources:
                    await self._copy_from(source, digest, download)
                    if download.position >= size:
                        break
            if download.writer is None:    # an empty blob: nothing was written
                await anyio.to_thread.run_sync(download.open)
            download.close()
            if download.position != size or download.hasher.hexdigest() != parsed.hex:
                raise ContentUnavailable(f"{digest}: fetched content does not match its digest")
            await self.store.ingest(parsed, download.path)
        finally:
            download.discard()

    async def _copy_from(self, source: Member, digest: str, download: "_Download") -> None:
        start = download.position
        try:
            async with self._peer_limiter(source.node_id):
                await self.peers.copy(source.grpc, digest, start, download.size - start,
                                      download.sink(self._bucket(source)))
        except PeerUnavailable as exc:
            log.info("transfer of %s from %s interrupted at %d: %s; resuming",
                     digest, source.node_id, download.position, exc)
        finally:
            self.bytes_fetched += download.position - start

    async def fetch_group(self, sizes: dict[str, int]) -> set[str]:
        """Read several small blobs from their common preferred holder in one ReadBlobs stream;
        returns the digests now in the store. One worker thread consumes the stream and writes
        each blob; a second one, as each blob completes, checks its digest and moves it into the
        store (fsync, rename, directory fsync), so the stream never waits for a disk flush and
        nothing hops back to the loop per chunk. The blobs not stored (the holder lacks them,
        the stream broke, the bytes were wrong) are left to the one-by-one fetch."""
        digests = list(sizes)
        sources = self.holders.live(digests[0])
        if not sources:
            return set()
        source = sources[0]
        parsed = [parse_digest(digest) for digest in digests]
        downloads = [_Download(self.store.staging_path(), hashlib.new(p.algorithm), sizes[d])
                     for p, d in zip(parsed, digests)]
        sinks = [download.sink(self._bucket(source)) for download in downloads]
        complete: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        stored: set[str] = set()

        def consume(index: int, offset: int, data: bytes | None, stopping: threading.Event) -> None:
            download = downloads[index]
            if data is None:
                return                      # not held there after all
            if download.position + len(data) > download.size:
                raise PeerUnavailable(f"{source.node_id}: more bytes than {digests[index]} has")
            sinks[index](data, stopping)
            if download.position == download.size:
                download.close()
                complete.put(index)

        def ingest_completed() -> None:
            while (index := complete.get()) is not None:
                if downloads[index].hasher.hexdigest() == parsed[index].hex:
                    self.store.ingest_blocking(parsed[index], downloads[index].path)
                    stored.add(digests[index])

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, ingest_completed)
                try:
                    async with self._peer_limiter(source.node_id):
                        await self.peers.copy_many(source.grpc, digests, consume)
                except PeerUnavailable as exc:
                    log.info("group transfer from %s interrupted: %s", source.node_id, exc)
                finally:
                    complete.put(None)      # the ingest thread ends after what is queued
        finally:
            for download in downloads:
                download.discard()
                self.bytes_fetched += download.position
        log.info("fetched %d of %d blobs from %s in one stream", len(stored), len(digests), source.node_id)
        return stored


class _Download:
    """A fetch's staging file and running digest. `sink()` callbacks run in the worker thread
    that consumes a holder's stream; the file is created there too, at the first chunk, by a
    storage.StagingWriter (O_DIRECT where the file system allows it: the blob goes to the disk
    without passing through the page cache)."""

    def __init__(self, path, hasher, size: int):
        self.path = path
        self.hasher = hasher
        self.size = size
        self.position = 0
        self.writer: StagingWriter | None = None

    def open(self) -> None:
        self.writer = StagingWriter(self.path)

    def sink(self, bucket: TokenBucket | None):
        def write(data: bytes, stopping: threading.Event) -> None:
            if bucket is not None:
                bucket.take(len(data), stopping)
            if self.writer is None:
                self.open()
            self.writer.write(data)
            self.hasher.update(data)
            self.position += len(data)
            if self.position >= self.size:
                self.writer.finish()   # complete: the store fsyncs it when it ingests (once)
        return write

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def discard(self) -> None:
        """Close and remove the staging file (gone already when the store ingested it)."""
        self.close()
        self.path.unlink(missing_ok=True)
