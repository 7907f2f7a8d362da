"""GC hold refreshes, off the read path.

A pull that finds a blob's hold older than half the grace period rewrites the blob record
(`ClusterMetadata.touch`), so that a sweep decided before the pull fails its re-check. That
write must not stand in the read's way: with etcd slow or away, a pull of bytes this node
has on disk would wait for etcd, or fail. So refreshes are queued here and done by a few
workers in the background: one at a time per digest (concurrent pulls of one layer share
it), at most `workers` at once, and at most `backlog` waiting (past that a refresh is
dropped; the next pull asks again). A failure is counted and logged at debug level only:
the hold is best effort, and the next pull of a still-cold blob tries again.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import anyio

from cargohold.coordinator.records import BlobRecord

log = logging.getLogger("cargohold.coordinator")

Touch = Callable[[str, BlobRecord], Awaitable[bool]]


class PendingRefresh:
    """One queued refresh; `outcome` is True (refreshed), False (the blob is gone) or None
    (not known: etcd failed) once `done` is set."""

    __slots__ = ("record", "done", "outcome")

    def __init__(self, record: BlobRecord) -> None:
        self.record = record
        self.done = anyio.Event()
        self.outcome: bool | None = None


class HoldRefresher:
    def __init__(self, touch: Touch, *, workers: int = 4, backlog: int = 1024) -> None:
        self._touch = touch
        self._workers = workers
        self._pending: dict[str, PendingRefresh] = {}
        self._send, self._receive = anyio.create_memory_object_stream[str](backlog)
        self.refreshed = 0      # refreshes written (or found unnecessary)
        self.failed = 0         # refreshes etcd did not take
        self.dropped = 0        # refreshes not queued: the backlog was full

    def request(self, digest: str, record: BlobRecord) -> PendingRefresh | None:
        """Queue a refresh of `digest` (or join the one queued); None if the backlog is full."""
        pending = self._pending.get(digest)
        if pending is not None:
            return pending
        try:
            self._send.send_nowait(digest)
        except anyio.WouldBlock:
            self.dropped += 1
            return None
        pending = self._pending[digest] = PendingRefresh(record)
        return pending

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(self._workers):
                tg.start_soon(self._work)

    async def _work(self) -> None:
        async for digest in self._receive:
            pending = self._pending[digest]
            try:
                pending.outcome = await self._touch(digest, pending.record)
                self.refreshed += 1
            except Exception as exc:  # noqa: BLE001 - best effort: counted, and the next pull retries
                self.failed += 1
                log.debug("GC hold of %s not refreshed: %s", digest, exc)
            finally:
                del self._pending[digest]
                pending.done.set()
