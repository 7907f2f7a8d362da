"""Keeps every blob on its owners, and serves content this node does not hold.

Driven by watch events: the coordinator tells us which blobs and whether membership changed
after each applied batch; we reconcile those blobs. Reconciling one blob means:

* this node is an owner and has no copy: fetch it from a holder over gRPC (same site first,
  resuming from the reached offset when a stream drops), verify the digest, move it into
  the store, and only then publish `blobs/<d>/at/<me>`;
* this node holds a copy it does not own (it received the upload, or ownership moved on a
  join or leave): withdraw it once every owner publishes a copy, in a transaction that
  re-checks those copies, so a blob never drops below its owners' count.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from typing import AsyncIterator

import anyio
import anyio.lowlevel

from cargohold.coordinator.metadata import ClusterMetadata, Member
from cargohold.runtime.grpc_bridge import StreamStopped
from cargohold.oci.reference import parse_digest
from cargohold.blobs.store import FilesystemBlobStore, StagingWriter
from cargohold.runtime.pacing import BackgroundPace, TokenAccount
from cargohold.replication.placement import owners, preference
from cargohold.replication.transfer import PeerClient, PeerUnavailable

log = logging.getLogger("cargohold.replication")

FETCH_ATTEMPTS = 6
# Condemned copies are released by many light tasks at once, so that their etcd writes share
# transactions (ClusterMetadata.group): a GC run condemns tens of thousands together.
RELEASE_WORKERS = 64
RETRY_DELAY = 0.5
# Small blobs that a node must fetch in bulk (a join, a repair) are read from one holder
# several per stream: per-blob stream set-up and loop round trips cost more than their bytes.
GROUP_BLOB_MAX = 8 * 1024 * 1024
GROUP_MAX_BLOBS = 64
GROUP_MAX_BYTES = 64 * 1024 * 1024
DISPATCH_YIELD = 256       # blobs classified between two yields to the event loop
MAX_RETRY_DELAY = 30.0


class ContentUnavailable(Exception):
    """No reachable node holds the blob."""


class StorageFull(Exception):
    """This node has no room (or no allowance) for another copy: retried with back-off."""


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


@dataclass
class ReplicationStats:
    queued: int = 0
    in_flight: int = 0
    copies_made: int = 0
    copies_dropped: int = 0
    copies_deleted: int = 0
    orphans_removed: int = 0
    bytes_fetched: int = 0
    failures: int = 0
    remote_reads: int = 0


class Replicator:
    def __init__(self, metadata: ClusterMetadata, store: FilesystemBlobStore, peers: PeerClient, *,
                 node_id: str, site: str, replicas_per_site: int = 2, down_after: float = 300.0,
                 workers: int = 8, gc_grace: float = 3600.0, per_peer_streams: int = 4,
                 site_bandwidth: dict[str, float] | None = None, storage_limit: int | None = None,
                 disk_reserve: int = 256 * 1024 * 1024, release_pace: BackgroundPace | None = None):
        self.release_pace = release_pace or BackgroundPace(None, 0)   # GC releases give way to clients
        self.gc_grace = gc_grace
        self.per_peer_streams = per_peer_streams
        self._peer_limiters: dict[str, anyio.CapacityLimiter] = {}
        self._buckets = {site: TokenBucket(rate) for site, rate in (site_bandwidth or {}).items()}
        self.storage_limit = storage_limit
        self.disk_reserve = disk_reserve
        self._waiting_on: dict[str, set[str]] = {}      # dependency digest -> manifests waiting for it
        self._failed: dict[str, dict] = {}              # digest -> {reason, attempts, since}
        self._rate = 0.0
        self.metadata = metadata
        self.store = store
        self.peers = peers
        self.node_id = node_id
        self.site = site
        self.replicas = replicas_per_site
        self.down_after = down_after
        self.workers = workers
        self.stats = ReplicationStats()
        self._pending: set[str] = set()
        self._in_progress: set[str] = set()
        self._full_pass = True
        self._wake = anyio.Event()
        self._dead_since: dict[str, float] = {}
        self._repairing: set[str] = set()
        self._seen_alive: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._retry_added = anyio.Event()
        self.drained = anyio.Event()
        metadata.subscribe(self._on_change)

    # ------------------------------------------------------------------ events
    def _on_change(self, blobs: set[str], sections: set[str]) -> None:
        self._pending |= blobs
        for digest in blobs:
            self._pending |= self._waiting_on.pop(digest, set())
        if "members" in sections or "policies" in sections:
            self._full_pass = True
        self._wake.set()

    def _track_liveness(self) -> float | None:
        """Note when members stopped being alive; return the next moment one becomes 'down'."""
        alive = self.metadata.alive()
        now = time.monotonic()
        for node_id, member in self.metadata.members().items():
            if node_id in alive:
                self._seen_alive.add(node_id)
                if self._dead_since.pop(node_id, None) is not None:
                    log.info("member %s is alive (%s)", node_id, member.state)
            elif node_id not in self._dead_since:
                self._dead_since[node_id] = now
                # A starting node writes its member record just before its alive key: only a
                # member we saw alive and then lost is news.
                if member.state != "left" and node_id in self._seen_alive:
                    log.warning("member %s is not alive: reads go to other holders; its blobs are "
                                "re-replicated if it stays down for %.0fs", node_id, self.down_after)
            elif now - self._dead_since[node_id] >= self.down_after and node_id not in self._repairing:
                self._repairing.add(node_id)
                if member.state == "active":
                    log.warning("member %s down for %.0fs: repair started, its blobs get new owners",
                                node_id, self.down_after)
        self._repairing &= set(self._dead_since)
        deadlines = [since + self.down_after for since in self._dead_since.values() if since + self.down_after > now]
        return min(deadlines) if deadlines else None

    def placement_candidates(self, site: str | None = None) -> list[str]:
        """Active members of `site` (default: ours) that are alive, or dead for less than `down_after`."""
        site = site or self.site
        now = time.monotonic()
        return [m.node_id for m in self.metadata.members().values()
                if m.site == site and m.state == "active"
                and now - self._dead_since.get(m.node_id, now) < self.down_after]

    def sites(self) -> set[str]:
        return {m.site for m in self.metadata.members().values() if m.state != "left"}

    def target_sites(self, digest: str) -> set[str]:
        """The sites whose replication rules call for this blob (by the repositories it is in)."""
        state = self.metadata.blob_states().get(digest)
        repos = state.repos if state is not None else ()
        return self.metadata.replication_rules().sites_for(repos, self.sites())

    def owners_of(self, digest: str, site: str | None = None) -> list[str]:
        return owners(digest, self.placement_candidates(site), self.replicas)

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        send, receive = anyio.create_memory_object_stream[str | tuple[str, ...]](self.workers * 4)
        release, released = anyio.create_memory_object_stream[str](RELEASE_WORKERS * 2)
        async with anyio.create_task_group() as tg:
            for _ in range(self.workers):
                tg.start_soon(self._worker, receive.clone())
            for _ in range(RELEASE_WORKERS):
                tg.start_soon(self._worker, released.clone())
            receive.close()
            released.close()
            tg.start_soon(self._down_timer)
            tg.start_soon(self._retry_timer)
            tg.start_soon(self._scrub_after_gc_runs)
            tg.start_soon(self._publish_status)
            async with send, release:
                while True:
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    batch = self._take_batch()
                    self.stats.queued = len(batch)
                    self._in_progress.update(batch)
                    await self._dispatch(batch, send, release)
                    await self._check_drained()

    def _take_batch(self) -> list[str]:
        if self._full_pass:
            self._full_pass = False
            self._pending.clear()
            return [d for d in list(self.metadata.blob_states()) if d not in self._in_progress]
        batch = [d for d in self._pending if d not in self._in_progress]
        self._pending.difference_update(batch)
        return batch

    async def _down_timer(self) -> None:
        """Wake a full pass when a dead member has been dead for `down_after`."""
        with self.metadata.changes(lambda _blobs, sections: "members" in sections) as membership:
            while True:
                deadline = self._track_liveness()
                wait = (deadline - time.monotonic() + 0.05) if deadline else 3600.0
                await membership.wait(max(wait, 0.05))
                self._full_pass = True
                self._wake.set()

    async def _dispatch(self, batch: list[str], send, release) -> None:
        """Hand a batch to the workers as it is classified (a full pass covers every blob, so
        this yields to the loop every DISPATCH_YIELD blobs): condemned copies to the release
        workers; small blobs this node must fetch grouped by the holder they would be read from
        (one ReadBlobs stream per group, sent when full or at the end); the rest one by one."""
        tombstones = self.metadata.tombstones()
        groups: dict[str, tuple[list[str], int]] = {}      # holder -> (digests, bytes)
        for count, digest in enumerate(batch, 1):
            if count % DISPATCH_YIELD == 0:
                await anyio.lowlevel.checkpoint()
            if digest in tombstones:
                await release.send(digest)
                continue
            source, size = self._group_source(digest)
            if source is None:
                await send.send(digest)
                continue
            group, group_bytes = groups.get(source, ([], 0))
            if group and (len(group) == GROUP_MAX_BLOBS or group_bytes + size > GROUP_MAX_BYTES):
                await send.send(tuple(group))
                group, group_bytes = [], 0
            group.append(digest)
            groups[source] = (group, group_bytes + size)
        for group, _ in groups.values():
            await send.send(tuple(group) if len(group) > 1 else group[0])

    def _group_source(self, digest: str) -> tuple[str | None, int]:
        """The holder to read `digest` from in a group, and its size, if it is a small blob
        this node must fetch now; (None, 0) otherwise."""
        size = self._fetch_size(digest)
        if size is None or not 0 < size <= GROUP_BLOB_MAX or not self._dependencies_here(digest):
            return None, 0
        sources = self._sources(digest)
        return (sources[0].node_id, size) if sources else (None, 0)

    def _fetch_size(self, digest: str) -> int | None:
        """The blob's size if this node must fetch it: it is recorded and not condemned, and
        this node is one of its owners in its site and publishes no copy yet."""
        state = self.metadata.blob_states().get(digest)
        if state is None or state.record is None or digest in self.metadata.tombstones():
            return None
        if self.site not in self.target_sites(digest) or self.metadata.publishes_copy(digest):
            return None
        return state.record.size if self.node_id in self.owners_of(digest) else None

    async def _worker(self, receive) -> None:
        async with receive:
            async for item in receive:
                if isinstance(item, tuple):
                    self.stats.in_flight += len(item)
                    try:
                        leftovers = await self._reconcile_group(item)
                    finally:
                        self.stats.in_flight -= len(item)
                    for digest in item:
                        if digest not in leftovers:
                            self._failed.pop(digest, None)
                            self._done(digest)
                    for digest in leftovers:     # fetched one by one, with retries
                        await self._reconcile_one(digest)
                else:
                    await self._reconcile_one(item)

    async def _reconcile_one(self, digest: str) -> None:
        self.stats.in_flight += 1
        try:
            await self.reconcile(digest)
            self._failed.pop(digest, None)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:  # noqa: BLE001 - one blob's failure must not stop the others
            self.stats.failures += 1
            failure = self._failed.setdefault(digest, {"since": time.time(), "attempts": 0})
            failure.update(reason=str(exc)[:300], attempts=failure["attempts"] + 1)
            log.warning("reconcile %s failed: %s; retrying later", digest, exc)
            self._retry_later(digest)
        finally:
            self.stats.in_flight -= 1
            self._done(digest)

    def _done(self, digest: str) -> None:
        self._in_progress.discard(digest)
        if self.stats.queued:
            self.stats.queued -= 1
        if not self._in_progress:
            self._wake.set()   # idle again: lets the loop see whether a drain is complete

    def _retry_later(self, digest: str) -> None:
        delay = min(RETRY_DELAY * 2 ** self._failed[digest]["attempts"], MAX_RETRY_DELAY)
        self._retry_at[digest] = time.monotonic() + delay
        self._retry_added.set()

    async def _retry_timer(self) -> None:
        """Hand failed blobs back to the workers when their back-off has passed."""
        while True:
            now = time.monotonic()
            due = [d for d, at in self._retry_at.items() if at <= now]
            for digest in due:
                del self._retry_at[digest]
                self._pending.add(digest)
            if due:
                self._wake.set()
            wait = min(self._retry_at.values(), default=now + 3600.0) - now
            self._retry_added = anyio.Event()
            with anyio.move_on_after(max(wait, 0.01)):
                await self._retry_added.wait()

    # ------------------------------------------------------------------ one blob
    async def reconcile(self, digest: str) -> None:
        run_id = self.metadata.tombstones().get(digest)
        if run_id is not None:
            await self._release_condemned(digest, run_id)
            return
        state = self.metadata.blob_states().get(digest)
        if state is None or state.record is None:
            return
        targets = self.target_sites(digest)
        site_owners = {site: self.owners_of(digest, site) for site in targets}
        my_owners = site_owners.get(self.site, [])
        holders = set(state.nodes)
        me = self.node_id
        parsed = parse_digest(digest)
        if me in my_owners and not self.metadata.publishes_copy(digest):   # _fetch_size, owners at hand
            if not self._dependencies_here(digest):
                return      # a manifest follows its blobs: woken again when they arrive here
            async with self.store.locked(parsed):
                if await self.store.stat(parsed) != state.record.size:
                    self._check_space(state.record.size)
                    await self.fetch(digest, state.record.size)
                await self._record_copy(digest, parsed, state.record.size)
            return
        needed = [owner for owners_in_site in site_owners.values() for owner in owners_in_site]
        if me in holders and me not in needed and needed and set(needed) <= holders:
            async with self.store.locked(parsed):
                if await self.metadata.drop_copy(digest, needed):
                    await self.store.delete(parsed)
                    self.stats.copies_dropped += 1
                    log.info("copy dropped: %s now on %s", digest, ",".join(needed))

    def _dependencies_here(self, digest: str) -> bool:
        """For a manifest: whether every blob and child it references has a copy in this site."""
        dependencies = self.metadata.manifest_dependencies(digest)
        if not dependencies:
            return True
        members = self.metadata.members()
        missing = [d for d in dependencies
                   if self.site in self.target_sites(d)
                   and not any(members.get(n) and members[n].site == self.site for n in self.metadata.holders(d))]
        for dependency in missing:
            self._waiting_on.setdefault(dependency, set()).add(digest)
        return not missing

    def _check_space(self, size: int) -> None:
        if self.storage_limit is not None:
            used = sum(s.record.size for s in self.metadata.blob_states().values()
                       if self.node_id in s.nodes and s.record is not None)
            if used + size > self.storage_limit:
                raise StorageFull(f"storage limit reached ({used} of {self.storage_limit} bytes used)")
        free = self.store.free_bytes()
        if free is not None and free - size < self.disk_reserve:
            raise StorageFull(f"disk full ({free} bytes free, {self.disk_reserve} kept in reserve)")

    async def _release_condemned(self, digest: str, run_id: str) -> None:
        """The GC tombstoned this blob: delete our copy, unless a re-upload lifts the tombstone
        first (the guarded transaction decides, under the digest's local lock)."""
        if self.node_id not in self.metadata.holders(digest):
            return
        await self.release_pace.take()
        parsed = parse_digest(digest)
        async with self.store.locked(parsed):
            if await self.metadata.release_tombstoned_copy(digest, run_id):
                await self.store.delete(parsed)
                self.stats.copies_deleted += 1
                log.info("copy deleted by gc run %s: %s", run_id, digest)
        if not self.metadata.holders(digest) - {self.node_id}:
            # The last copy: the tombstone has done its work. (When holders release at the
            # same moment, none of them is last here; the GC leader clears those.)
            await self.metadata.clear_tombstone(digest, run_id)

    async def _scrub_after_gc_runs(self) -> None:
        """When a GC run finishes, every node scrubs its own disk (the leader cannot); at most
        once per grace period, since a file younger than that is never removed anyway (a walk
        of 100,000 files after each of several back-to-back runs only costs the clients)."""
        scrubbed = {r for r, run in self.metadata.gc_runs().items() if run.get("state") == "done"}
        last_scrub = float("-inf")
        with self.metadata.changes(lambda _blobs, sections: "gc" in sections) as gc_changes:
            while True:
                await gc_changes.wait()
                done = {r for r, run in self.metadata.gc_runs().items()
                        if run.get("state") == "done" and not run.get("dry_run")}
                if done - scrubbed and time.monotonic() - last_scrub >= self.gc_grace:
                    scrubbed |= done
                    last_scrub = time.monotonic()
                    self.stats.orphans_removed += await self.scrub(self.gc_grace)

    async def scrub(self, grace: float) -> int:
        """Delete local files that etcd does not know this node holds and that are older than
        the grace period (left by a crash between writing a file and publishing it)."""
        known = {d for d, s in self.metadata.blob_states().items() if self.node_id in s.nodes}
        cutoff = time.time() - grace

        def unaccounted() -> list:
            # In a worker thread: a walk of every file, and the comparison, kept off the loop.
            return [digest for digest, mtime in self.store.inventory()
                    if mtime < cutoff and str(digest) not in known]

        removed = 0
        for digest in await anyio.to_thread.run_sync(unaccounted):
            text = str(digest)
            if text in self._in_progress:
                continue
            async with self.store.locked(digest):
                if self.node_id not in self.metadata.holders(text):
                    await self.store.delete(digest)
                    removed += 1
                    log.warning("scrub: removed %s, a local file no etcd record accounts for", text)
        return removed

    async def _check_drained(self) -> None:
        """A draining node is done when it holds no copy any more."""
        member = self.metadata.members().get(self.node_id)
        if member is None or member.state != "draining" or self.drained.is_set():
            return
        if self._in_progress or self._pending:
            return
        if any(self.node_id in s.nodes for s in self.metadata.blob_states().values()):
            return
        await self.metadata.set_member_state(self.node_id, "left")
        log.info("drained: every blob this node held has its copies elsewhere; leaving")
        self.drained.set()

    def held_count(self, node_id: str) -> tuple[int, int]:
        count = size = 0
        for state in self.metadata.blob_states().values():
            if node_id in state.nodes and state.record is not None:
                count += 1
                size += state.record.size
        return count, size

    # ------------------------------------------------------------------ transfers
    def _sources(self, digest: str) -> list[Member]:
        members = self.metadata.members()
        alive = self.metadata.alive()
        same_site = {m.node_id for m in members.values() if m.site == self.site}
        holders = [n for n in self.metadata.holders(digest) if n in alive and n in members]
        ordered = preference(digest, holders, me=self.node_id, same_site=same_site)
        return [members[n] for n in ordered if n != self.node_id and members[n].grpc]

    def _peer_limiter(self, node_id: str) -> anyio.CapacityLimiter:
        limiter = self._peer_limiters.get(node_id)
        if limiter is None:
            limiter = self._peer_limiters[node_id] = anyio.CapacityLimiter(self.per_peer_streams)
        return limiter

    def _bucket(self, source: Member) -> TokenBucket | None:
        """The bandwidth limit for fetches from `source`'s site (none within our own site)."""
        return self._buckets.get(source.site) if source.site != self.site else None

    def can_read(self, digest: str) -> bool:
        """Whether some live peer publishes a copy (checked before a response starts)."""
        return bool(self._sources(digest))

    async def _reconcile_group(self, group: tuple[str, ...]) -> set[str]:
        """Fetch and record a group of small blobs read from one holder in one stream, under
        every digest's local lock (taken in sorted order: no other path holds two). Returns the
        digests still to reconcile one by one: those this node no longer needs to fetch (their
        own reconcile decides what to do), those the stream did not deliver intact, and all of
        them when something else failed."""
        parsed = {digest: parse_digest(digest) for digest in group}
        recorded: set[str] = set()
        try:
            async with AsyncExitStack() as locks:
                for digest in sorted(group):
                    await locks.enter_async_context(self.store.locked(parsed[digest]))
                sizes = {digest: size for digest in group if (size := self._fetch_size(digest)) is not None}
                present = {d for d in sizes if await self.store.stat(parsed[d]) == sizes[d]}
                missing = {d: size for d, size in sizes.items() if d not in present}
                self._check_space(sum(missing.values()))

                async def record(digest: str) -> None:
                    if await self._record_copy(digest, parsed[digest], sizes[digest]):
                        recorded.add(digest)

                have = present | (await self._fetch_group(missing) if missing else set())
                # all at once, after the stream: concurrent records share transactions, and the
                # old holders' withdrawals come together too
                async with anyio.create_task_group() as records:
                    for digest in have:
                        records.start_soon(record, digest)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:  # noqa: BLE001 - the blobs are retried one by one
            log.info("group fetch of %d blobs stopped: %s; going on one by one", len(group), exc)
        return set(group) - recorded

    async def _record_copy(self, digest: str, parsed, size: int) -> bool:
        """Publish the copy now in the store (under the digest's lock). True when that is
        settled: recorded, or the blob was swept meanwhile and the file is gone again."""
        if await self.metadata.record_copy(digest):
            self.stats.copies_made += 1
            log.info("copy made: %s (%d bytes)", digest, size)
            return True
        if self.node_id not in self.metadata.holders(digest):
            await self.store.delete(parsed)   # swept while we fetched: leave nothing behind
            return True
        return False

    async def _fetch_group(self, sizes: dict[str, int]) -> set[str]:
        """Read several small blobs from their common preferred holder in one ReadBlobs stream;
        returns the digests now in the store. One worker thread consumes the stream and writes
        each blob; a second one, as each blob completes, checks its digest and moves it into the
        store (fsync, rename, directory fsync), so the stream never waits for a disk flush and
        nothing hops back to the loop per chunk. The blobs not stored (the holder lacks them,
        the stream broke, the bytes were wrong) are left to the one-by-one fetch."""
        digests = list(sizes)
        sources = self._sources(digests[0])
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
                self.stats.bytes_fetched += download.position
        log.info("fetched %d of %d blobs from %s in one stream", len(stored), len(digests), source.node_id)
        return stored

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
            async with aclosing(self._holders_in_turn(digest, lambda: download.position > 0)) as sources:
                async for source in sources:
                    start = download.position
                    try:
                        async with self._peer_limiter(source.node_id):
                            await self.peers.copy(source.grpc, digest, start, size - start,
                                                  download.sink(self._bucket(source)))
                    except PeerUnavailable as exc:
                        log.info("transfer of %s from %s interrupted at %d: %s; resuming",
                                 digest, source.node_id, download.position, exc)
                    finally:
                        self.stats.bytes_fetched += download.position - start
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

    async def read_remote(self, digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """Stream part of a blob this node does not hold from the nearest holder, chunk by chunk
        (never the whole blob in memory), going on from the reached offset with the next
        holder when a stream drops."""
        self.stats.remote_reads += 1
        position, end = offset, offset + length
        async with aclosing(self._holders_in_turn(digest, lambda: position > offset)) as sources:
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

    async def _holders_in_turn(self, digest: str, started) -> AsyncIterator[Member]:
        """The live holders of a blob, nearest first, round after round with a growing pause in
        between, until the caller has what it needs and stops iterating. ContentUnavailable
        when no live node holds it before anything was read (`started()` false), or after
        FETCH_ATTEMPTS rounds."""
        for attempt in range(FETCH_ATTEMPTS):
            sources = self._sources(digest)
            if not sources and not started():
                raise ContentUnavailable(f"no live node holds {digest}")
            for source in sources:
                yield source
            await anyio.sleep(RETRY_DELAY * (attempt + 1))
        raise ContentUnavailable(f"{digest}: could not read from any holder")

    async def read_remote_all(self, digest: str, size: int) -> bytes:
        return b"".join([chunk async for chunk in self.read_remote(digest, 0, size)])

    def sites_holding(self, digest: str) -> set[str]:
        members = self.metadata.members()
        return {members[n].site for n in self.metadata.holders(digest) if n in members}

    async def wait_for_copies(self, digest: str, copies: int, timeout: float) -> bool:
        """Wait until `copies` nodes publish a copy of `digest` (for --min-copies)."""
        return await self._wait_until(digest, lambda: len(self.metadata.holders(digest)) >= copies, timeout)

    async def wait_for_sites(self, digest: str, other_sites: int, timeout: float) -> bool:
        """Wait until `other_sites` sites besides ours hold `digest` (for --sync-sites), or as
        many as the replication rules send it to, if that is fewer."""
        other_sites = min(other_sites, len(self.target_sites(digest) - {self.site}))
        return await self._wait_until(digest, lambda: len(self.sites_holding(digest) - {self.site}) >= other_sites,
                                      timeout)

    async def _wait_until(self, digest: str, satisfied, timeout: float) -> bool:
        if satisfied():
            return True
        with self.metadata.changes(lambda blobs, _sections: digest in blobs and satisfied()) as done:
            await done.wait(timeout)
        return satisfied()

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        now = time.time()
        failed = sorted(self._failed.items(), key=lambda item: item[1]["since"])
        return {
            "node": self.node_id, "site": self.site, "time": now,
            "queued": len(self._pending) + self.stats.queued, "in_flight": self.stats.in_flight,
            "waiting_for_dependencies": sum(len(v) for v in self._waiting_on.values()),
            "failed": len(failed),
            "failures": [{"digest": d, **f} for d, f in failed[:20]],
            "bytes_fetched": self.stats.bytes_fetched, "copies_made": self.stats.copies_made,
            "copies_dropped": self.stats.copies_dropped, "rate": round(self._rate, 1),
            "remote_reads": self.stats.remote_reads,
        }

    async def _publish_status(self, interval: float = 2.0) -> None:
        """Report this node's figures in etcd for `cargohold replication status` (a report, not a poll)."""
        last_bytes, last_time, last = self.stats.bytes_fetched, time.monotonic(), None
        while True:
            await anyio.sleep(interval)
            now = time.monotonic()
            self._rate = (self.stats.bytes_fetched - last_bytes) / max(now - last_time, 1e-6)
            last_bytes, last_time = self.stats.bytes_fetched, now
            status = self.status()
            comparable = {k: v for k, v in status.items() if k != "time"}
            if comparable != last or status["queued"] or status["in_flight"]:
                try:
                    await self.metadata.publish_status(status)
                    last = comparable
                except Exception as exc:  # noqa: BLE001 - status is best effort
                    log.debug("could not publish replication status: %s", exc)


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
