"""Keeps every blob on its owners: the executor of `plan`'s decisions.

Driven by watch events: the coordinator tells us which blobs and whether membership changed
after each applied batch; we reconcile those blobs. `plan.decide` says what one blob needs:

* FETCH: this node is an owner and has no copy: fetch it from a holder over gRPC (`fetch`),
  verify the digest, move it into the store, and only then publish `blobs/<d>/at/<me>`;
* DROP: this node holds a copy it does not own (it received the upload, or ownership moved on
  a join or leave): withdraw it once every owner publishes a copy, in a transaction that
  re-checks those copies, so a blob never drops below its owners' count;
* WAIT: a manifest waits until its site holds what it references (woken when that arrives).

Condemned (tombstoned) copies are the garbage collector's: `cargohold.gc.node_sweep`.
"""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Callable

import anyio
import anyio.lowlevel

from cargohold.blobs.store import FilesystemBlobStore
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.oci.reference import parse_digest
from cargohold.replication import plan
from cargohold.replication.fetch import Fetcher
from cargohold.replication.plan import Action, BlobFacts, ClusterView, Decision, FetchGroups, Liveness
from cargohold.replication.sources import Holders, ReplicationSettings, cluster_view
from cargohold.replication.status import publish_status
from cargohold.replication.transfer import PeerClient
from cargohold.replication.work import ReconcileQueue

log = logging.getLogger("cargohold.replication")

DISPATCH_YIELD = 256       # blobs classified between two yields to the event loop


class StorageFull(Exception):
    """This node has no room (or no allowance) for another copy: retried with back-off."""


@dataclass
class ReplicationStats:
    in_flight: int = 0
    copies_made: int = 0
    copies_dropped: int = 0
    failures: int = 0


class Replicator:
    def __init__(self, metadata: ClusterMetadata, store: FilesystemBlobStore, peers: PeerClient,
                 settings: ReplicationSettings):
        self.metadata = metadata
        self.store = store
        self.settings = settings
        self.holders = Holders(metadata, settings)
        self.fetcher = Fetcher(store, peers, self.holders, settings)
        self.liveness = Liveness(settings.down_after)
        self.stats = ReplicationStats()
        self.drained = anyio.Event()
        self.queue = ReconcileQueue()
        self.status_sections: dict[str, Callable[[], object]] = {}   # more of the node's status record
        metadata.subscribe(self._on_change)

    def _on_change(self, blobs: set[str], sections: set[str]) -> None:
        self.queue.changed(blobs, full_pass="members" in sections or "policies" in sections)

    def queue_depth(self) -> int:
        return self.queue.depth()

    # ------------------------------------------------------------------ decisions
    def view(self) -> ClusterView:
        return cluster_view(self.metadata, self.settings, self.liveness)

    def facts(self, digest: str) -> BlobFacts | None:
        state = self.metadata.blob_states().get(digest)
        if state is None:
            return None
        return BlobFacts(state.record.size if state.record is not None else None, frozenset(state.nodes),
                         frozenset(state.repos), condemned=digest in self.metadata.tombstones(),
                         publishes_copy=self.metadata.publishes_copy(digest),
                         dependencies=self.metadata.manifest_dependencies(digest) or ())

    def decide(self, digest: str, view: ClusterView | None = None) -> Decision:
        facts = self.facts(digest)
        if facts is None:
            return plan.IDLE
        decision = plan.decide(digest, facts, view or self.view(), self.facts)
        for dependency in decision.waiting_on:      # woken again when they arrive here
            self.queue.wait_for(dependency, digest)
        return decision

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        send, receive = anyio.create_memory_object_stream[str | tuple[str, ...]](self.settings.workers * 4)
        async with anyio.create_task_group() as tg:
            for _ in range(self.settings.workers):
                tg.start_soon(self._worker, receive.clone())
            receive.close()
            tg.start_soon(self._down_timer)
            tg.start_soon(self.queue.retry_timer)
            tg.start_soon(publish_status, self.metadata, self.status, lambda: self.fetcher.bytes_fetched)
            async with send:
                while True:
                    batch = await self.queue.next_batch(self.metadata.blob_states)
                    await self._dispatch(batch, send)
                    await self._check_drained()

    async def _down_timer(self) -> None:
        """Wake a full pass when a dead member has been dead for `down_after`."""
        with self.metadata.changes(lambda _blobs, sections: "members" in sections) as membership:
            while True:
                deadline = self.liveness.observe(self.metadata.members(), self.metadata.alive(), time.monotonic())
                wait = (deadline - time.monotonic() + 0.05) if deadline else 3600.0
                await membership.wait(max(wait, 0.05))
                self.queue.changed((), full_pass=True)

    async def _dispatch(self, batch: list[str], send) -> None:
        """Hand a batch to the workers as it is classified (a full pass covers every blob, so
        this yields to the loop every DISPATCH_YIELD blobs): small blobs this node must fetch
        grouped by the holder they would be read from (one ReadBlobs stream per group, sent
        when full or at the end); the rest one by one."""
        view = self.view()
        groups = FetchGroups()
        for count, digest in enumerate(batch, 1):
            if count % DISPATCH_YIELD == 0:
                await anyio.lowlevel.checkpoint()
            decision = self.decide(digest, view)
            if decision.action in (Action.IDLE, Action.WAIT):
                self.queue.succeeded(digest)
                self.queue.done(digest)     # a change to it, or to what it waits for, wakes it again
                continue
            sources = view.sources(digest, self.metadata.holders(digest)) if decision.action is Action.FETCH else []
            if not sources or not plan.groupable(decision.size):
                await send.send(digest)
                continue
            full = groups.add(sources[0].node_id, digest, decision.size)
            if full:
                await send.send(tuple(full))
        for group in groups.rest():
            await send.send(tuple(group) if len(group) > 1 else group[0])

    async def _worker(self, receive) -> None:
        async with receive:
            async for item in receive:
                if isinstance(item, tuple):
                    await self._reconcile_group_then_rest(item)
                else:
                    await self._reconcile_one(item)

    async def _reconcile_group_then_rest(self, group: tuple[str, ...]) -> None:
        self.stats.in_flight += len(group)
        try:
            leftovers = await self._reconcile_group(group)
        finally:
            self.stats.in_flight -= len(group)
        for digest in group:
            if digest not in leftovers:
                self.queue.succeeded(digest)
                self.queue.done(digest)
        for digest in leftovers:     # fetched one by one, with retries
            await self._reconcile_one(digest)

    async def _reconcile_one(self, digest: str) -> None:
        self.stats.in_flight += 1
        try:
            await self.reconcile(digest)
            self.queue.succeeded(digest)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:  # noqa: BLE001 - one blob's failure must not stop the others
            self.stats.failures += 1
            log.warning("reconcile %s failed: %s; retrying later", digest, exc)
            self.queue.failed(digest, str(exc))
        finally:
            self.stats.in_flight -= 1
            self.queue.done(digest)

    # ------------------------------------------------------------------ one blob
    async def reconcile(self, digest: str) -> None:
        decision = self.decide(digest)
        parsed = parse_digest(digest)
        if decision.action is Action.FETCH:
            async with self.store.locked(parsed):
                if await self.store.stat(parsed) != decision.size:
                    self._check_space(decision.size)
                    await self.fetcher.fetch(digest, decision.size)
                await self._record_copy(digest, parsed, decision.size)
        elif decision.action is Action.DROP:
            async with self.store.locked(parsed):
                if await self.metadata.drop_copy(digest, list(decision.owners)):
                    await self.store.delete(parsed)
                    self.stats.copies_dropped += 1
                    log.info("copy dropped: %s now on %s", digest, ",".join(decision.owners))

    def _fetch_sizes(self, group: tuple[str, ...]) -> dict[str, int]:
        """Of a group, the blobs this node must still fetch, and their sizes."""
        view = self.view()
        decisions = {digest: self.decide(digest, view) for digest in group}
        return {d: decision.size for d, decision in decisions.items() if decision.action is Action.FETCH}

    def _check_space(self, size: int) -> None:
        limit = self.settings.storage_limit
        if limit is not None:
            used = sum(s.record.size for s in self.metadata.blob_states().values()
                       if self.settings.node_id in s.nodes and s.record is not None)
            if used + size > limit:
                raise StorageFull(f"storage limit reached ({used} of {limit} bytes used)")
        free = self.store.free_bytes()
        reserve = self.settings.disk_reserve
        if free is not None and free - size < reserve:
            raise StorageFull(f"disk full ({free} bytes free, {reserve} kept in reserve)")

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
                sizes = self._fetch_sizes(group)
                present = {d for d in sizes if await self.store.stat(parsed[d]) == sizes[d]}
                missing = {d: size for d, size in sizes.items() if d not in present}
                self._check_space(sum(missing.values()))

                async def record(digest: str) -> None:
                    if await self._record_copy(digest, parsed[digest], sizes[digest]):
                        recorded.add(digest)

                have = present | (await self.fetcher.fetch_group(missing) if missing else set())
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
        if self.settings.node_id not in self.metadata.holders(digest):
            await self.store.delete(parsed)   # swept while we fetched: leave nothing behind
            return True
        return False

    # ------------------------------------------------------------------ drain and status
    async def _check_drained(self) -> None:
        """A draining node is done when it holds no copy any more."""
        me = self.settings.node_id
        member = self.metadata.members().get(me)
        if member is None or member.state != "draining" or self.drained.is_set():
            return
        if not self.queue.idle():
            return
        if any(me in s.nodes for s in self.metadata.blob_states().values()):
            return
        await self.metadata.set_member_state(me, "left")
        log.info("drained: every blob this node held has its copies elsewhere; leaving")
        self.drained.set()

    def status(self) -> dict:
        return {
            "node": self.settings.node_id, "site": self.settings.site, "time": time.time(),
            **self.queue.report(), "in_flight": self.stats.in_flight,
            "bytes_fetched": self.fetcher.bytes_fetched, "copies_made": self.stats.copies_made,
            "copies_dropped": self.stats.copies_dropped,
            **{section: report() for section, report in self.status_sections.items()},
        }
