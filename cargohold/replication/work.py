"""Which blobs wait for a reconcile, and when a failed one is tried again (no decisions here)."""

from __future__ import annotations

import time
from typing import Callable, Iterable

import anyio

from cargohold.replication import plan


class ReconcileQueue:
    """Blobs that changed, blobs a manifest waits for, failed blobs past their back-off. A
    full pass (membership or policies changed) takes every blob. A blob handed out is 'in
    progress' until `done`, and is not handed out twice meanwhile."""

    def __init__(self) -> None:
        self.queued = 0                                 # of the last batch, not done yet
        self.in_progress: set[str] = set()
        self.wake = anyio.Event()
        self._pending: set[str] = set()
        self._full_pass = True
        self.wake.set()                                 # the first pass is due at once
        self._waiting_on: dict[str, set[str]] = {}      # dependency digest -> manifests waiting for it
        self._failed: dict[str, dict] = {}              # digest -> {reason, attempts, since}
        self._retry_at: dict[str, float] = {}
        self._retry_added = anyio.Event()

    def changed(self, blobs: Iterable[str], full_pass: bool = False) -> None:
        self._pending.update(blobs)
        for digest in blobs:
            self._pending |= self._waiting_on.pop(digest, set())
        self._full_pass |= full_pass
        self.wake.set()

    def wait_for(self, dependency: str, digest: str) -> None:
        """Reconcile `digest` again when `dependency` changes."""
        self._waiting_on.setdefault(dependency, set()).add(digest)

    async def next_batch(self, every_blob: Callable[[], Iterable[str]]) -> list[str]:
        """Wait until there is work, and take it (now in progress)."""
        await self.wake.wait()
        self.wake = anyio.Event()
        if self._full_pass:
            self._full_pass = False
            self._pending.clear()
            batch = [d for d in list(every_blob()) if d not in self.in_progress]
        else:
            batch = [d for d in self._pending if d not in self.in_progress]
            self._pending.difference_update(batch)
        self.queued = len(batch)
        self.in_progress.update(batch)
        return batch

    def done(self, digest: str) -> None:
        self.in_progress.discard(digest)
        if self.queued:
            self.queued -= 1
        if not self.in_progress:
            self.wake.set()   # idle again: lets the loop see whether a drain is complete

    def idle(self) -> bool:
        return not self.in_progress and not self._pending

    def depth(self) -> int:
        return self.queued + len(self._pending)

    def succeeded(self, digest: str) -> None:
        self._failed.pop(digest, None)

    def failed(self, digest: str, reason: str) -> None:
        """Note the failure and hand the blob back after a growing back-off."""
        failure = self._failed.setdefault(digest, {"since": time.time(), "attempts": 0})
        failure.update(reason=reason[:300], attempts=failure["attempts"] + 1)
        self._retry_at[digest] = time.monotonic() + plan.retry_delay(failure["attempts"])
        self._retry_added.set()

    def report(self) -> dict:
        failed = sorted(self._failed.items(), key=lambda item: item[1]["since"])
        return {"queued": self.depth(), "waiting_for_dependencies": sum(len(v) for v in self._waiting_on.values()),
                "failed": len(failed), "failures": [{"digest": d, **f} for d, f in failed[:20]]}

    async def retry_timer(self) -> None:
        """Hand failed blobs back when their back-off has passed."""
        while True:
            now = time.monotonic()
            due = [d for d, at in self._retry_at.items() if at <= now]
            for digest in due:
                del self._retry_at[digest]
            if due:
                self.changed(due)
            wait = min(self._retry_at.values(), default=now + 3600.0) - now
            self._retry_added = anyio.Event()
            with anyio.move_on_after(max(wait, 0.01)):
                await self._retry_added.wait()
