"""Which cached images are still used, and the release of those that are not.

`PullRecorder` remembers in memory which cached images (`hub/library/alpine`) were pulled and
writes their last-pulled times to etcd every `interval` seconds, all of them in one transaction:
a busy node costs etcd one write per interval, not one per pull.

`Evictor` runs on the node that leads garbage collection (one node at a time, without a lock of
its own): every `interval` seconds, for each remote repository with `evict_unused_after`, it
releases the cached images whose last use is older (`unused_images`, pure). Releasing deletes
their tags and manifests (`coordinator.cacheusage`); the next GC run then frees the blobs that
nothing else references. `cargohold repo remove` releases through the same module.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

import anyio

from cargohold.coordinator.cacheusage import CacheUsage, Released
from cargohold.coordinator.etcd import EtcdError
from cargohold.coordinator.metadata import ClusterMetadata

log = logging.getLogger("cargohold.pullthrough")

PULL_RECORD_INTERVAL = 30.0      # seconds between two writes of the last-pulled times
EVICTION_INTERVAL = 3600.0       # seconds between two eviction passes
FINAL_FLUSH_TIMEOUT = 2.0        # at shutdown, the pulls noted since the last write get this long


def unused_images(images: Mapping[str, float], pulled: Mapping[str, float], now: float,
                  unused_after: float) -> list[tuple[str, float]]:
    """(local name, last use) of the cached images unused for longer than `unused_after`.

    An image's last use is its last recorded pull or, if later (or never pulled since it was
    recorded), the creation of its newest manifest: a fill is a use, and an image cached a
    moment ago is never released for lack of a recorded pull."""
    found = []
    for name, created in sorted(images.items()):
        last_use = max(created, pulled.get(name, 0.0))
        if now - last_use > unused_after:
            found.append((name, last_use))
    return found


class PullRecorder:
    def __init__(self, metadata: ClusterMetadata, *, interval: float = PULL_RECORD_INTERVAL,
                 clock: Callable[[], float] = time.time):
        self.usage = CacheUsage(metadata)
        self.interval = interval
        self.clock = clock
        self.writes = 0                       # transactions written (for tests and metrics)
        self._pending: dict[str, float] = {}  # local name -> time of its latest pull not yet written

    def note(self, local_name: str) -> None:
        """A pull of a cached image (a manifest GET): remembered, written with the next batch."""
        self._pending[local_name] = self.clock()

    async def flush(self) -> int:
        """Write what was noted since the last flush; returns how many images it wrote. On an
        etcd failure the pulls are kept for the next flush (and the error raised)."""
        pending, self._pending = self._pending, {}
        if not pending:
            return 0
        try:
            self.writes += await self.usage.record_pulls(pending)
        except BaseException:
            for name, when in pending.items():      # pulls noted meanwhile are newer: they win
                self._pending.setdefault(name, when)
            raise
        return len(pending)

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await anyio.sleep(self.interval)
                try:
                    await self.flush()
                except EtcdError as exc:
                    log.warning("could not record last-pulled times (kept for the next try): %s", exc)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(FINAL_FLUSH_TIMEOUT):
                try:
                    await self.flush()
                except EtcdError:
                    pass      # lost: at worst an image looks unused one interval earlier


class Evictor:
    def __init__(self, metadata: ClusterMetadata, *, interval: float = EVICTION_INTERVAL,
                 audit: Callable[..., None] = lambda *args, **fields: None,
                 clock: Callable[[], float] = time.time):
        self.metadata = metadata
        self.usage = CacheUsage(metadata)
        self.interval = interval
        self.audit = audit
        self.clock = clock
        self.released = 0                     # images released by this node (for tests and metrics)

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await anyio.sleep(self.interval)
            if self.metadata.gc_leader() != self.metadata.node_id:
                continue
            try:
                await self.evict_once()
            except EtcdError as exc:
                log.warning("eviction pass interrupted (etcd): %s; next pass in %.0f s", exc, self.interval)

    async def evict_once(self) -> list[Released]:
        """One pass over every remote repository with `evict_unused_after`."""
        done = []
        for definition in list(self.metadata.repository_definitions().values()):
            if definition.evict_unused_after is None:
                continue
            images = self.usage.cached_images(definition.name)
            if not images:
                continue
            pulled = await self.usage.last_pulls(definition.name)
            for name, last_use in unused_images(images, pulled, self.clock(), definition.evict_unused_after):
                done.append(await self.release(name, definition.name, last_use))
        return done

    async def release(self, local_name: str, repository: str, last_use: float) -> Released:
        released = await self.usage.release_image(local_name)
        self.released += released.complete
        idle = self.clock() - last_use
        if released.complete:
            log.info("evicted %s (remote repository %s): unused for %.0f s; released %d tags and %d "
                     "manifests for GC", local_name, repository, idle, released.tags, released.manifests)
        else:
            log.info("kept %s: it was pulled or filled while being evicted", local_name)
        self.audit("evict", repository=local_name, remote=repository, unused_seconds=round(idle),
                   tags=released.tags, manifests=released.manifests, complete=released.complete)
        return released
