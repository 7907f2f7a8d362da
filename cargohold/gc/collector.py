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
   tombstone;
4. cleanup: clears the tombstones whose copies are all released, many per transaction,
   until no live node holds a copy the run condemned.

This module is the logic; how each step is written to etcd (and guarded by this node's
leadership) is `cargohold.coordinator.gcstate`. A write that finds the leadership gone ends
the run here quietly: the next leader resumes it. Time comes from `clock` (wall-clock
seconds), so tests can place a collector past the grace period instead of sleeping.

Pushes and pulls go on throughout: nothing here takes a lock another request waits for.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable, Mapping

import anyio

from cargohold.gc import mark as gcmark
from cargohold.coordinator.etcd import EtcdError
from cargohold.coordinator.gcstate import GcState, Leadership, LostLeadership
from cargohold.coordinator.metadata import ChangeSignal, ClusterMetadata, TagImmutable
from cargohold.coordinator.policies import retention_deletions
from cargohold.coordinator.records import Snapshot
from cargohold.runtime.memory import without_cycle_collection
from cargohold.runtime.pacing import BackgroundPace

log = logging.getLogger("cargohold.gc")

Clock = Callable[[], float]

SWEEP_WORKERS = 16
ETCD_RETRY_DELAY = 2.0
SWEEP_BATCH = 64           # dead blobs per sweep transaction (4 ops and 2 guards each, under 4096)
PROGRESS_INTERVAL = 0.5
MAX_MARK_ROUNDS = 4
CLEANUP_PATIENCE = 60.0    # how long cleanup waits for live holders that release nothing
CLEANUP_TICK = 0.25
MODEL_CATCH_UP = 10.0      # how long the mark waits for the read model before reading etcd
FINISHED = ("done", "failed")


def new_run(dry_run: bool, reason: str = "requested", now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]
    return {"id": run_id, "state": "requested", "dry_run": dry_run, "reason": reason,
            "requested": now, "phase": "queued", "marked": 0, "candidates": 0,
            "candidate_bytes": 0, "swept": 0, "bytes_freed": 0, "manifests_deleted": 0,
            "tags_deleted": 0, "retention": [], "leaders": []}


# ---------------------------------------------------------------------- the schedule (pure)
def in_window(now: float, window: tuple[int, int] | None) -> bool:
    """Whether `now` falls in the (start minute, end minute) of the UTC day; a window may wrap
    past midnight. No window: always."""
    if window is None:
        return True
    minute = int(now // 60) % 1440
    start, end = window
    return start <= minute < end if start <= end else (minute >= start or minute < end)


def scheduled_run_due(now: float, last_finished: float, interval: float, window: tuple[int, int] | None) -> bool:
    return bool(interval) and now - last_finished >= interval and in_window(now, window)


def seconds_until_scheduled(now: float, last_finished: float, interval: float) -> float | None:
    """How long the leader may sleep before looking at the schedule again (None: no schedule)."""
    if not interval:
        return None
    return max(interval - (now - last_finished), 1.0)


class GarbageCollector:
    def __init__(self, metadata: ClusterMetadata, *, grace: float = 3600.0, untagged_after: float | None = None,
                 interval: float = 0.0, window: tuple[int, int] | None = None, workers: int = SWEEP_WORKERS,
                 batch: int = SWEEP_BATCH, pace: BackgroundPace | None = None, clock: Clock = time.time):
        self.pace = pace or BackgroundPace(None, 0)    # sweeps give way to this node's clients
        self.batch = max(batch, 1)
        self.metadata = metadata
        self.state = GcState(metadata)
        self.node_id = metadata.node_id
        self.grace = grace
        self.untagged_after = untagged_after
        self.interval = interval
        self.window = window          # (start minute, end minute) of the UTC day for scheduled runs
        self.workers = workers
        self.clock = clock
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
            leadership = None
            if self.metadata.gc_leader() is None and lease is not None:
                leadership = await self.state.campaign(lease)
            if leadership is None:
                await self._changes.wait(5.0 if self.metadata.gc_leader() is None else None)
                continue
            log.info("this node leads garbage collection")
            try:
                await self._lead(leadership)
            finally:
                log.info("this node no longer leads garbage collection")

    async def _lead(self, leadership: Leadership) -> None:
        try:
            while self.state.holds(leadership):
                run = self._next_run()
                if run is not None:
                    await self.execute(run, leadership)
                    continue
                now, last = self.clock(), self._last_finished()
                await self._changes.wait(seconds_until_scheduled(now, last, self.interval))
                if scheduled_run_due(self.clock(), self._last_finished(), self.interval, self.window):
                    run = new_run(dry_run=False, reason="scheduled", now=self.clock())
                    await self.state.put_run(run, leadership, visible=True)
        except LostLeadership:
            pass       # another node leads now (or none yet): campaign again when the key goes

    def _next_run(self) -> dict | None:
        pending = [r for r in self.metadata.gc_runs().values() if r.get("state") not in FINISHED]
        return min(pending, key=lambda r: r.get("requested", 0), default=None)

    def _last_finished(self) -> float:
        return max((r.get("finished", 0) for r in self.metadata.gc_runs().values()), default=0.0)

    # ------------------------------------------------------------------ one run
    async def execute(self, run: dict, leadership: Leadership) -> dict:
        """Run `run` to its end and record it; raises LostLeadership (after an INFO line, and
        without touching the record) when this node turns out not to lead any more."""
        run = dict(run)
        resumed = run["state"] == "running"
        run.update(state="running", leader=self.node_id, started=run.get("started") or self.clock(),
                   leaders=run.get("leaders", []) + [self.node_id])
        log.info("gc run %s %s%s", run["id"], "resumed" if resumed else "started", " (dry run)" if run["dry_run"] else "")
        try:
            await self._phases(run, leadership)
            run.update(state="done", phase="done", finished=self.clock())
        except Exception as exc:  # noqa: BLE001 - record why, keep the cluster serving
            if _lost_leadership(exc):
                self._leadership_lost(run)
            etcd_failure = _etcd_failure(exc)
            if etcd_failure is not None:
                raise etcd_failure from exc   # not the run's fault: it stays `running` and is resumed
            log.exception("gc run %s failed", run["id"])
            run.update(state="failed", error=_describe_error(exc), finished=self.clock())
        run["duration"] = round(run["finished"] - run["started"], 3)
        try:
            await self.state.put_run(run, leadership, visible=True)
        except LostLeadership:
            self._leadership_lost(run)
        log.info("gc run %s %s: marked %d, candidates %d, swept %d blobs (%d bytes of copies freed), "
                 "%d manifests, %d tags", run["id"], run["state"], run["marked"], run["candidates"], run["swept"],
                 run["bytes_freed"], run["manifests_deleted"], run["tags_deleted"])
        return run

    def _leadership_lost(self, run: dict) -> None:
        """Not an error: the node that leads now resumes (or has finished) the run, and the
        record is theirs to write. Ends this node's leading (`_lead`), with no record change."""
        log.info("gc run %s: this node no longer leads; the run is left to the current leader", run["id"])
        raise LostLeadership() from None

    async def _phases(self, run: dict, leadership: Leadership) -> None:
        progress = _Progress(self, run, leadership)
        self.metadata.subscribe(progress.copies.changed)
        try:
            await self._run_phases(run, progress)
        finally:
            self.metadata.unsubscribe(progress.copies.changed)

    async def _run_phases(self, run: dict, progress: "_Progress") -> None:
        run["phase"] = "retention"
        await progress.flush(force=True)
        await self._apply_retention(run, progress.leadership)
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
                await self._sweep(batches, self._sweep_blobs, progress, units=len)
                break
            # Dead manifests first; their blobs become candidates in the next mark.
            await self._sweep(result.dead_manifests, self._sweep_manifest, progress)
        run["phase"] = "cleanup"
        await progress.flush(force=True)
        await self._cleanup(progress)

    async def _apply_retention(self, run: dict, leadership: Leadership) -> None:
        policies = self.metadata.policies()
        if not policies.retention:
            return
        snapshot = await self.snapshot()
        by_repo: dict[str, dict[str, tuple[str, float]]] = {}
        for (repo, tag), digest in snapshot.tags.items():
            record = snapshot.manifests.get((repo, digest))
            by_repo.setdefault(repo, {})[tag] = (digest, record[0].created if record else 0.0)
        now = self.clock()
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
                if await self.state.delete_tag(item["repository"], item["tag"], item["digest"], leadership):
                    run["tags_deleted"] += 1
            except TagImmutable:
                continue

    async def _mark(self, snapshot: Snapshot) -> gcmark.MarkResult:
        """The mark, in a worker thread: a large one takes a tenth of a second or more, which
        this node's clients should not wait for."""
        now = self.clock()

        def mark() -> gcmark.MarkResult:
            with without_cycle_collection():
                return gcmark.mark(snapshot, now, self.grace, self.untagged_after)
        return await anyio.to_thread.run_sync(mark)

    async def snapshot(self) -> Snapshot:
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
        return await self.state.read_snapshot()

    async def _sweep(self, items: list, sweep_one, progress: "_Progress", units=lambda _item: 1) -> None:
        """`sweep_one` over `items`, `workers` at a time, each item paced as `units(item)` dead
        blobs."""
        send, receive = anyio.create_memory_object_stream(self.workers * 2)

        async def worker(items_in) -> None:
            async with items_in:
                async for item in items_in:
                    await self.pace.take(units(item))
                    await sweep_one(item, progress)
                    await progress.flush()

        async with anyio.create_task_group() as tg:
            for _ in range(self.workers):
                tg.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                for item in items:
                    progress.check()
                    await send.send(item)

    async def _sweep_manifest(self, item: tuple[str, str, int], progress: "_Progress") -> None:
        repo, digest, revision = item
        if await self.state.sweep_manifest(repo, digest, revision, progress.leadership):
            progress.run["manifests_deleted"] += 1

    async def _sweep_blobs(self, batch: list[tuple[str, int, int]], progress: "_Progress") -> None:
        """Tombstone a batch in one transaction; if any blob's re-check fails (it was touched,
        re-uploaded or referenced since the mark), sweep the batch blob by blob instead."""
        try:
            condemned = await self.state.tombstone_blobs(batch, progress.run["id"], progress.leadership)
        except EtcdError:          # e.g. an etcd with a low --max-txn-ops: one at a time still works
            condemned = None
        if condemned is not None:
            for digest, _, size in batch:
                progress.condemned(digest, size, condemned[digest])
            return
        for item in batch:
            copies = await self.state.tombstone_blob(item, progress.run["id"], progress.leadership)
            if copies is not None:
                progress.condemned(item[0], item[2], copies)

    async def _cleanup(self, progress: "_Progress") -> None:
        """Clear tombstones as their copies are released, until every copy this run condemned
        on a live node is gone. Holders release on their own (each node, for its copies); the
        last one usually clears the tombstone too, and what holders released at the same moment
        is cleared here, many per transaction. A copy on a node that is down keeps its
        tombstone until the node is back and releases it (cleared then, or by a later run).

        `tombstones_left` is counted after the clears are visible in the read model, and the
        cleanup ends only once every tombstone left waits for a node that is down: a tombstone
        whose last copy was released a moment ago is cleared first, not reported as left."""
        run = progress.run
        last_change, last_left = time.monotonic(), None
        with self.metadata.changes(lambda blobs, sections: bool(blobs) or "members" in sections) as changed:
            while True:
                progress.check()
                released = _released(self.metadata.tombstones(), self.metadata.blob_states())
                if released:
                    await self.state.clear_tombstones(released, progress.leadership)
                left = [d for d, r in self.metadata.tombstones().items() if r == run["id"]]
                unsettled = _unsettled(left, self.metadata.blob_states(), self.metadata.alive())
                run["tombstones_left"] = len(left)
                progress.tally()
                await progress.flush()
                if not unsettled:
                    return
                if left != last_left:
                    last_change, last_left = time.monotonic(), left
                elif time.monotonic() - last_change > CLEANUP_PATIENCE:
                    log.warning("gc run %s: %d condemned copies or tombstones still not released after %.0fs; "
                                "their tombstones stay (cleared when released)", run["id"], len(unsettled),
                                CLEANUP_PATIENCE)
                    return
                # Releases come in a stream; look again at most every CLEANUP_TICK, so each
                # look clears a batch, not one tombstone.
                waited = time.monotonic()
                await changed.wait(PROGRESS_INTERVAL)
                await anyio.sleep(max(0.0, CLEANUP_TICK - (time.monotonic() - waited)))


def _released(tombstones: Mapping[str, str], blobs: Mapping) -> dict[str, str]:
    """Tombstones whose blob has no key left (every copy released): ready to be cleared."""
    return {d: r for d, r in tombstones.items() if (state := blobs.get(d)) is None or state.empty()}


def _unsettled(left: list[str], blobs: Mapping, alive: set[str]) -> list[str]:
    """Of the run's remaining tombstones, those cleanup still waits for: a copy on a live node
    not yet released, or no copy left but the tombstone not yet cleared. (The others wait for
    nodes that are down.)"""
    unsettled = []
    for digest in left:
        state = blobs.get(digest)
        if state is None or not state.nodes or state.nodes & alive:
            unsettled.append(digest)
    return unsettled


class _Condemned:
    """The copies this leader's sweep condemned, and the bytes of those released so far: a
    copy counts once the node that held it has withdrawn its record (it deletes the file
    right after), so copies on nodes that are down are not counted as freed. Only blobs the
    watch changed are looked at again, so a tally costs what was released, not what is
    still waiting (cleanup tallies every quarter second)."""

    def __init__(self, already_freed: int):
        self.freed = already_freed          # a resumed run keeps what its earlier leaders counted
        self.pending: dict[str, tuple[int, frozenset[str]]] = {}    # digest -> (size, nodes still holding)
        self._changed: set[str] = set()

    def add(self, digest: str, size: int, holders: frozenset[str]) -> None:
        if holders:
            self.pending[digest] = (size, holders)
            self._changed.add(digest)      # its release may have come before its tombstone's answer

    def changed(self, blobs: set, _sections: set) -> None:
        """A read-model listener (it must not block: it only notes the digests)."""
        if self.pending:
            self._changed.update(blobs & self.pending.keys())

    def bytes_freed(self, blobs: Mapping) -> int:
        for digest in self._changed:
            entry = self.pending.get(digest)
            if entry is None:
                continue
            size, holding = entry
            state = blobs.get(digest)
            still = holding & state.nodes if state is not None else frozenset()
            self.freed += size * (len(holding) - len(still))
            if still:
                self.pending[digest] = (size, frozenset(still))
            else:
                del self.pending[digest]
        self._changed.clear()
        return self.freed


class _Progress:
    """The run as it goes: writes its record now and then (guarded by the leadership, like
    every write of the run), stops the run early if the read model shows the leadership gone,
    and counts the bytes freed."""

    def __init__(self, collector: GarbageCollector, run: dict, leadership: Leadership):
        self.collector = collector
        self.run = run
        self.leadership = leadership
        self.copies = _Condemned(run.get("bytes_freed", 0))
        self.last = 0.0

    def check(self) -> None:
        if not self.collector.state.holds(self.leadership):
            raise LostLeadership()

    def condemned(self, digest: str, size: int, holders: frozenset[str]) -> None:
        self.run["swept"] += 1
        self.copies.add(digest, size, holders)

    def tally(self) -> None:
        self.run["bytes_freed"] = self.copies.bytes_freed(self.collector.metadata.blob_states())

    async def flush(self, force: bool = False) -> None:
        self.check()
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self.run["updated"] = self.collector.clock()
            self.tally()
            await self.collector.state.put_run(self.run, self.leadership)


def _lost_leadership(exc: BaseException) -> bool:
    """Whether `exc` is (or a task group's error carries) a lost leadership: then the rest of
    the group's errors are its consequences (workers cut short), not failures of the run."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(LostLeadership) is not None
    return isinstance(exc, LostLeadership)


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
