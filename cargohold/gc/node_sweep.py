"""The garbage collector's work that every node does on its own disk.

The elected leader (`collector`) condemns blobs with tombstones; it cannot delete other nodes'
files. Each node runs a `NodeSweep`, which:

* releases its condemned copies: withdraws its copy record while the tombstone still stands
  (a re-upload lifts the tombstone, and then the copy must stay), then deletes the file, and
  clears the tombstone once it held the last copy;
* after a GC run, scrubs its disk: files that no copy record accounts for and that are older
  than the grace period are removed (a crash between writing a file and publishing it), and
  copy records whose file is gone are withdrawn, so placement repairs them from another holder.

Every deletion happens under the digest's lock in the store, the same lock uploads and fetches
take, so no path deletes a file another is publishing.
"""

from __future__ import annotations

import logging
import time

import anyio

from cargohold.blobs.store import FilesystemBlobStore
from cargohold.coordinator.damaged import withdraw_damaged_copy
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.oci.reference import parse_digest
from cargohold.runtime.pacing import BackgroundPace

log = logging.getLogger("cargohold.gc")

# Condemned copies are released by many light tasks at once, so that their etcd writes share
# transactions (ClusterMetadata.group): a GC run condemns tens of thousands together.
RELEASE_WORKERS = 64


class NodeSweep:
    def __init__(self, metadata: ClusterMetadata, store: FilesystemBlobStore, *, node_id: str,
                 grace: float, pace: BackgroundPace | None = None, workers: int = RELEASE_WORKERS):
        self.metadata = metadata
        self.store = store
        self.node_id = node_id
        self.grace = grace
        self.pace = pace or BackgroundPace(None, 0)    # releases give way to clients
        self.workers = workers
        self.copies_deleted = 0
        self.orphans_removed = 0
        self.copies_withdrawn = 0
        self._pending: set[str] = set()
        self._in_progress: set[str] = set()
        self._wake = anyio.Event()
        metadata.subscribe(self._on_change)

    def _on_change(self, blobs: set[str], _sections: set[str]) -> None:
        self._pending |= blobs
        self._wake.set()

    async def run(self) -> None:
        send, receive = anyio.create_memory_object_stream[str](self.workers * 2)
        self._pending |= set(self.metadata.tombstones())
        async with anyio.create_task_group() as tg:
            for _ in range(self.workers):
                tg.start_soon(self._releaser, receive.clone())
            receive.close()
            tg.start_soon(self._scrub_after_gc_runs)
            async with send:
                while True:
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    for digest in self._condemned_here():
                        self._in_progress.add(digest)
                        await send.send(digest)

    def _condemned_here(self) -> list[str]:
        """Of the blobs that changed, those condemned that this node holds a copy of."""
        tombstones = self.metadata.tombstones()
        changed, self._pending = self._pending, set()
        return [d for d in changed if d in tombstones and d not in self._in_progress
                and self.node_id in self.metadata.holders(d)]

    async def _releaser(self, receive) -> None:
        async with receive:
            async for digest in receive:
                try:
                    run_id = self.metadata.tombstones().get(digest)
                    if run_id is not None:
                        await self.release(digest, run_id)
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:  # noqa: BLE001 - the next change to it tries again
                    log.warning("release of %s failed: %s", digest, exc)
                finally:
                    self._in_progress.discard(digest)

    async def release(self, digest: str, run_id: str) -> None:
        """The GC tombstoned this blob: delete our copy, unless a re-upload lifts the tombstone
        first (the guarded transaction decides, under the digest's local lock)."""
        if self.node_id not in self.metadata.holders(digest):
            return
        await self.pace.take()
        parsed = parse_digest(digest)
        async with self.store.locked(parsed):
            if await self.metadata.release_tombstoned_copy(digest, run_id):
                await self.store.delete(parsed)
                self.copies_deleted += 1
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
                if done - scrubbed and time.monotonic() - last_scrub >= self.grace:
                    scrubbed |= done
                    last_scrub = time.monotonic()
                    await self.scrub(self.grace)

    async def scrub(self, grace: float) -> tuple[int, int]:
        """Compare this node's files with its copy records: remove files older than `grace`
        that no record accounts for, and withdraw records whose file is missing. Returns
        (files removed, records withdrawn)."""
        known = {d for d, s in self.metadata.blob_states().items() if self.node_id in s.nodes}
        cutoff = time.time() - grace

        def compare() -> tuple[list, list]:
            # In a worker thread: a walk of every file, and the comparison, kept off the loop.
            files = {str(digest): (digest, mtime) for digest, mtime in self.store.inventory()}
            orphans = [digest for text, (digest, mtime) in files.items() if mtime < cutoff and text not in known]
            return orphans, sorted(known - set(files))

        orphans, missing = await anyio.to_thread.run_sync(compare)
        removed = sum([await self._remove_orphan(digest) for digest in orphans])
        withdrawn = sum([await self._withdraw_if_missing(text) for text in missing])
        self.orphans_removed += removed
        self.copies_withdrawn += withdrawn
        return removed, withdrawn

    async def _remove_orphan(self, digest) -> bool:
        async with self.store.locked(digest):
            # publishes_copy also sees a copy record this node wrote that the model lacks yet
            if self.metadata.publishes_copy(str(digest)):
                return False
            await self.store.delete(digest)
        log.warning("scrub: removed %s, a local file no etcd record accounts for", digest)
        return True

    async def _withdraw_if_missing(self, text: str) -> bool:
        digest = parse_digest(text)
        if self.node_id not in self.metadata.holders(text) or await self.store.stat(digest) is not None:
            return False
        await withdraw_damaged_copy(self.metadata, self.store, digest, "scrub found no file")
        return True
