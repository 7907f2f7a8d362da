"""Online, cluster-wide garbage collection (DESIGN.md, "Garbage collection").

One node leads (its `gc/leader` key is bound to its membership lease, so leadership ends when
the node does). Runs are records `gc/runs/<id>`: `cargohold gc run` writes one in state
`requested`; the leader executes requested and interrupted (`running`) runs in order, so a
run that lost its leader is resumed by the next one. A run:

1. retention: deletes the tags that retention rules select (each guarded by its digest);
2. mark: reads manifests, tags and blob records at one revision and computes the live set;
3. sweep: deletes dead manifests (untagged_after), re-marks, then tombstones dead blobs, each
   in its own transaction that re-checks what the mark saw (the record's revision, and that no
   reverse reference exists), many at once. A tombstone removes the blob's record and its
   repository links in the same transaction, so a manifest PUT that needs the blob fails
   cleanly, and a re-upload lifts it. Every node deletes its own copy when it sees the
   tombstone (cargohold/replication/replicator.py);
4. cleanup: clears the tombstones whose copies are all released, many per transaction,
   until no live node holds a copy the run condemned.

Pushes and pulls go on throughout: nothing here takes a lock another request waits for.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import anyio

from cargohold.gc import mark as gcmark
from cargohold.coordinator.etcd import Compare, Delete, EtcdError, Put
from cargohold.coordinator.metadata import ChangeSignal, ClusterMetadata, TagImmutable
from cargohold.coordinator.policies import retention_deletions
from cargohold.coordinator.readmodel import without_cycle_collection
from cargohold.coordinator.records import BlobRecord, ManifestRecord
from cargohold.runtime.pacing import BackgroundPace

log = logging.getLogger("cargohold.gc")

SWEEP_WORKERS = 16
ETCD_RETRY_DELAY = 2.0
SWEEP_BATCH = 64           # dead blobs per sweep transaction (3 ops and 2 guards each, under 4096)
PROGRESS_INTERVAL = 0.5
MAX_MARK_ROUNDS = 4
CLEANUP_PATIENCE = 60.0    # how long cleanup waits for live holders that release nothing
CLEANUP_TICK = 0.25
MODEL_CATCH_UP = 10.0      # how long the mark waits for the read model before reading etcd
FINISHED = ("done", "failed")


def new_run(dry_run: bool, reason: str = "requested") -> dict[str, Any]:
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    return {"id": run_id, "state": "requested", "dry_run": dry_run, "reason": reason,
            "requested": time.time(), "phase": "queued", "marked": 0, "candidates": 0,
            "candidate_bytes": 0, "swept": 0, "bytes_freed": 0, "manifests_deleted": 0,
            "tags_deleted": 0, "retention": [], "leaders": []}


class GarbageCollector:
    def __init__(self, metadata: ClusterMetadata, *, grace: float = 3600.0, untagged_after: float | None = None,
                 interval: float = 0.0, window: tuple[int, int] | None = None, workers: int = SWEEP_WORKERS,
                 batch: int = SWEEP_BATCH, pace: BackgroundPace | None = None):
        self.pace = pace or BackgroundPace(None, 0)    # sweeps give way to this node's clients
        self.batch = max(batch, 1)
        self.metadata = metadata
        self.keys = metadata.keys
        self.client = metadata.client
        self.node_id = metadata.node_id
        self.grace = grace
        self.untagged_after = untagged_after
        self.interval = interval
        self.window = window          # (start minute, end minute) of the UTC day for scheduled runs
        self.workers = workers
        metadata.grace = grace
        self._changes = ChangeSignal(lambda _blobs, sections: "gc" in sections or "members" in sections)
        metadata.subscribe(self._changes)

    # ------------------------------------------------------------------ leadership
    async def run(self) -> None:
        """Campaign and lead; an etcd outage costs this node the GC role for a while, never its life."""
        while True:
            try:
                await self._campaign_and_lead()
            except Exception as error:  # noqa: BLE001 - only etcd outages are handled here
                exc = _etcd_failure(error)
                if exc is None:
                    raise
                # An interrupted run stays `running` in etcd and is resumed by whoever leads next.
                log.warning("garbage collection paused: etcd is unavailable (%s); retrying", exc)
                await anyio.sleep(ETCD_RETRY_DELAY)

    async def _campaign_and_lead(self) -> None:
        while True:
            if self.metadata.lease is None:
                await self.metadata.lease_granted.wait()
            lease = self.metadata.lease
            if self.metadata.gc_leader() is None and lease is not None and await self._campaign(lease):
                log.info("this node leads garbage collection")
                try:
                    await self._lead(lease)
                finally:
                    log.info("this node no longer leads garbage collection")
            else:
                await self._changes.wait(5.0 if self.metadata.gc_leader() is None else None)

    async def _campaign(self, lease: int) -> bool:
        key = self.keys.gc_leader()
        result = await self.client.txn([Compare.missing(key)], [Put(key, self.node_id.encode(), lease=lease)])
        if result.succeeded:
            await self.metadata.wait_for_revision(result.revision, 2.0)
        return result.succeeded

    def _leading(self, lease: int) -> bool:
        return self.metadata.gc_leader() == self.node_id and self.metadata.lease == lease

    async def _lead(self, lease: int) -> None:
        while self._leading(lease):
            run = self._next_run()
            if run is not None:
                await self.execute(run, lease)
                continue
            await self._changes.wait(self._until_scheduled())
            if self._scheduled_run_due():
                await self._put_run(new_run(dry_run=False, reason="scheduled"))

    def _next_run(self) -> dict | None:
        pending = [r for r in self.metadata.gc_runs().values() if r.get("state") not in FINISHED]
        return min(pending, key=lambda r: r.get("requested", 0), default=None)

    def _last_finished(self) -> float:
        return max((r.get("finished", 0) for r in self.metadata.gc_runs().values()), default=0.0)

    def _scheduled_run_due(self) -> bool:
        if not self.interval or time.time() - self._last_finished() < self.interval:
            return False
        if self.window is None:
            return True
        minute = int(time.time() // 60) % 1440
        start, end = self.window
        return start <= minute < end if start <= end else (minute >= start or minute < end)

    def _until_scheduled(self) -> float | None:
        if not self.interval:
            return None
        return max(self.interval - (time.time() - self._last_finished()), 1.0)

    # ------------------------------------------------------------------ one run
    async def _put_run(self, run: dict) -> None:
        result = await self.client.txn([], [Put(self.keys.gc_run(run["id"]), _encode(run))])
        await self.metadata.wait_for_revision(result.revision, 2.0)

    async def execute(self, run: dict, lease: int) -> dict:
        run = dict(run)
        resumed = run["state"] == "running"
        run.update(state="running", leader=self.node_id, started=run.get("started") or time.time(),
                   leaders=run.get("leaders", []) + [self.node_id])
        log.info("gc run %s %s%s", run["id"], "resumed" if resumed else "started", " (dry run)" if run["dry_run"] else "")
        try:
            await self._phases(run, lease)
            run.update(state="done", phase="done", finished=time.time())
        except _LostLeadership:
            log.warning("gc run %s: leadership lost; the next leader resumes it", run["id"])
            return run
        except Exception as exc:  # noqa: BLE001 - record why, keep the cluster serving
            etcd_failure = _etcd_failure(exc)
            if etcd_failure is not None:
                raise etcd_failure from exc   # not the run's fault: it stays `running` and is resumed
            log.exception("gc run %s failed", run["id"])
            run.update(state="failed", error=_describe_error(exc), finished=time.time())
        run["duration"] = round(run["finished"] - run["started"], 3)
        await self._put_run(run)
        log.info("gc run %s %s: marked %d, candidates %d, swept %d blobs (%d bytes), %d manifests, %d tags",
                 run["id"], run["state"], run["marked"], run["candidates"], run["swept"], run["bytes_freed"],
                 run["manifests_deleted"], run["tags_deleted"])
        return run

    async def _phases(self, run: dict, lease: int) -> None:
        progress = _Progress(self, run, lease)
        run["phase"] = "retention"
        await progress.flush(force=True)
        await self._apply_retention(run)
        for _ in range(MAX_MARK_ROUNDS):
            run["phase"] = "mark"
            await progress.flush(force=True)
            result = await self._mark(await self.snapshot())
            run.update(marked=len(result.live_blobs), candidates=len(result.candidates),
                       candidate_bytes=result.candidate_bytes, revision=result.revision,
                       dead_manifests=len(result.dead_manifests))
            if run["dry_run"]:
                run["would_free"] = {"blobs": len(result.candidates), "bytes": result.candidate_bytes,
                                     "manifests": len(result.dead_manifests)}
                return
            run["phase"] = "sweep"
            await progress.flush(force=True)
            if not result.dead_manifests:
                size = self.batch
                batches = [result.candidates[i:i + size] for i in range(0, len(result.candidates), size)]
                await self._sweep(batches, self._sweep_blobs, run, progress, units=len)
                break
            # Dead manifests first; their blobs become candidates in the next mark.
            await self._sweep(result.dead_manifests, self._sweep_manifest, run, progress)
        run["phase"] = "cleanup"
        await progress.flush(force=True)
        await self._cleanup(run, progress)

    async def _apply_retention(self, run: dict) -> None:
        policies = self.metadata.policies()
        if not policies.retention:
            return
        snapshot = await self.snapshot()
        by_repo: dict[str, dict[str, tuple[str, float]]] = {}
        for (repo, tag), digest in snapshot.tags.items():
            record = snapshot.manifests.get((repo, digest))
            by_repo.setdefault(repo, {})[tag] = (digest, record[0].created if record else 0.0)
        now = time.time()
        planned = []
        for repo, tags in sorted(by_repo.items()):
            for tag, rule in retention_deletions(policies, repo, tags, now):
                planned.append({"repository": repo, "tag": tag, "digest": tags[tag][0], "rule": rule.describe()})
        run["retention"] = planned[:1000]
        run["retention_planned"] = len(planned)
        if run["dry_run"]:
            return
        for item in planned:
            try:
                if await self.metadata.delete_tag(item["repository"], item["tag"], expected_digest=item["digest"]):
                    run["tags_deleted"] += 1
            except TagImmutable:
                continue

    async def _mark(self, snapshot: gcmark.Snapshot) -> gcmark.MarkResult:
        """The mark, in a worker thread: a large one takes a tenth of a second or more, which
        this node's clients should not wait for."""
        def mark() -> gcmark.MarkResult:
            with without_cycle_collection():
                return gcmark.mark(snapshot, time.time(), self.grace, self.untagged_after)
        return await anyio.to_thread.run_sync(mark)

    async def snapshot(self) -> gcmark.Snapshot:
        """Manifests, tags and blob records at one revision.

        The read model is exactly etcd at its revision, so once it has caught up with a write
        made now it is as fresh as a read of etcd, and costs etcd nothing: reading 600,000
        keys walks etcd's index for seconds while pushes queue behind it. Only when the watch
        lags is etcd read.
        """
        try:
            caught_up = await self.metadata.catch_up(MODEL_CATCH_UP)
        except TimeoutError:       # etcd too slow to take the probe: the read below says why
            caught_up = False
        if caught_up:
            return self.metadata.gc_snapshot()
        log.warning("gc: the read model lags etcd; reading the snapshot from etcd")
        return await self.read_snapshot()

    async def read_snapshot(self) -> gcmark.Snapshot:
        """The same snapshot, read from etcd."""
        revision = await self.client.current_revision()
        snapshot = gcmark.Snapshot(revision)
        for section in ("manifests", "tags", "blobs"):
            async for kvs in self.client.iter_prefix(self.keys.section_prefix(section), revision=revision):
                for kv in kvs:
                    parsed = self.keys.parse(kv.key)
                    if parsed.kind == "manifest":
                        snapshot.manifests[(parsed.repo, parsed.digest)] = (ManifestRecord.decode(kv.value),
                                                                             kv.mod_revision)
                    elif parsed.kind == "tag":
                        snapshot.tags[(parsed.repo, parsed.name)] = kv.value.decode()
                    elif parsed.kind == "blob":
                        snapshot.blobs[parsed.digest] = (BlobRecord.decode(kv.value), kv.mod_revision)
        return snapshot

    async def _sweep(self, items: list, sweep_one, run: dict, progress: "_Progress",
                     units=lambda _item: 1) -> None:
        """`sweep_one` over `items`, `workers` at a time, each item paced as `units(item)` dead
        blobs."""
        send, receive = anyio.create_memory_object_stream(self.workers * 2)

        async def worker(items_in) -> None:
            async with items_in:
                async for item in items_in:
                    await self.pace.take(units(item))
                    await sweep_one(item, run)
                    await progress.flush()

        async with anyio.create_task_group() as tg:
            for _ in range(self.workers):
                tg.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                for item in items:
                    progress.check()
                    await send.send(item)

    async def _sweep_manifest(self, item: tuple[str, str, int], run: dict) -> None:
        repo, digest, revision = item
        keys = self.keys
        kv = await self.client.get(keys.manifest(repo, digest))
        if kv is None or kv.mod_revision != revision:
            return          # re-pushed or re-tagged since the mark: alive after all
        record = ManifestRecord.decode(kv.value)
        result = await self.client.txn(
            [Compare.mod_revision_equals(kv.key, revision),
             Compare.none_with_prefix(f"{keys.refs_prefix(digest)}{repo}@")],
            [Delete(kv.key), Delete(keys.blob_in(digest, repo)),
             *(Delete(keys.ref(child, repo, digest)) for child in dict.fromkeys(record.references()))])
        if result.succeeded:
            run["manifests_deleted"] += 1

    def _tombstone_ops(self, item: tuple[str, int, int], run_id: str) -> tuple[list, list]:
        """The re-check and the tombstone of one dead blob (see the module docstring)."""
        digest, revision, _ = item
        keys = self.keys
        guard = [Compare.mod_revision_equals(keys.blob(digest), revision), Compare.none_with_prefix(keys.refs_prefix(digest))]
        ops = [Put(keys.tombstone(digest), run_id.encode()), Delete(keys.blob(digest)),
               Delete(keys.blob_in_prefix(digest), prefix=True)]
        return guard, ops

    async def _sweep_blobs(self, batch: list[tuple[str, int, int]], run: dict) -> None:
        """Tombstone a batch in one transaction; if any blob's re-check fails (it was touched,
        re-uploaded or referenced since the mark), sweep the batch blob by blob instead."""
        compare, success = [], []
        for item in batch:
            guard, ops = self._tombstone_ops(item, run["id"])
            compare += guard
            success += ops
        try:
            result = await self.client.txn(compare, success)
        except EtcdError:          # e.g. an etcd with a low --max-txn-ops: one at a time still works
            result = None
        if result is not None and result.succeeded:
            run["swept"] += len(batch)
            run["bytes_freed"] += sum(size for _, _, size in batch)
            return
        for item in batch:
            await self._sweep_blob(item, run)

    async def _sweep_blob(self, item: tuple[str, int, int], run: dict) -> None:
        guard, ops = self._tombstone_ops(item, run["id"])
        result = await self.client.txn(guard, ops)
        if result.succeeded:
            run["swept"] += 1
            run["bytes_freed"] += item[2]

    async def _cleanup(self, run: dict, progress: "_Progress") -> None:
        """Clear tombstones as their copies are released, until every copy this run condemned
        on a live node is gone. Holders release on their own (each node, for its copies); the
        last one usually clears the tombstone too, and what holders released at the same moment
        is cleared here, many per transaction. A copy on a node that is down keeps its
        tombstone until the node is back and releases it (cleared then, or by a later run)."""
        last_change, last_left = time.monotonic(), None
        with self.metadata.changes(lambda blobs, sections: bool(blobs) or "members" in sections) as changed:
            while True:
                progress.check()
                tombstones, blobs = self.metadata.tombstones(), self.metadata.blob_states()
                released = {d: r for d, r in tombstones.items()
                            if (state := blobs.get(d)) is None or state.empty()}
                if released:
                    await self.metadata.clear_tombstones(released)
                alive = self.metadata.alive()
                left = [d for d, r in tombstones.items() if r == run["id"]]
                waiting = [d for d in left if (state := blobs.get(d)) is not None and state.nodes & alive]
                run["tombstones_left"] = len(left)
                await progress.flush()
                if not waiting:
                    return
                if left != last_left:
                    last_change, last_left = time.monotonic(), left
                elif time.monotonic() - last_change > CLEANUP_PATIENCE:
                    log.warning("gc run %s: %d copies on live nodes still not released after %.0fs; "
                                "their tombstones stay (cleared when released)", run["id"], len(waiting),
                                CLEANUP_PATIENCE)
                    return
                # Releases come in a stream; look again at most every CLEANUP_TICK, so each
                # look clears a batch, not one tombstone.
                waited = time.monotonic()
                await changed.wait(PROGRESS_INTERVAL)
                await anyio.sleep(max(0.0, CLEANUP_TICK - (time.monotonic() - waited)))


class _LostLeadership(Exception):
    pass


class _Progress:
    """Writes the run record now and then, and stops the run if leadership is lost."""

    def __init__(self, collector: GarbageCollector, run: dict, lease: int):
        self.collector = collector
        self.run = run
        self.lease = lease
        self.last = 0.0

    def check(self) -> None:
        if not self.collector._leading(self.lease):
            raise _LostLeadership()

    async def flush(self, force: bool = False) -> None:
        self.check()
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self.run["updated"] = time.time()
            await self.collector.client.txn([], [Put(self.collector.keys.gc_run(self.run["id"]), _encode(self.run))])


def _etcd_failure(exc: BaseException) -> EtcdError | None:
    """The EtcdError behind `exc`, also when task groups wrapped it; None for anything else."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        found = [_etcd_failure(e) for e in exc.exceptions]
        return found[0] if all(found) else None
    return exc if isinstance(exc, EtcdError) else None


def _describe_error(exc: BaseException) -> str:
    """Name the real failure, not the task group that carried it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _encode(run: dict) -> bytes:
    return json.dumps(run, separators=(",", ":")).encode()
