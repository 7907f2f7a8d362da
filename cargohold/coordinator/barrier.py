"""Linearizable reads from the read model, at the price of one etcd round trip per burst.

A read that must see every write acknowledged anywhere before it arrived (a tag moved through
another node) asks `ReadBarrier.revision()` for etcd's revision as of a moment after the read
began, then waits until the read model has applied it. Reads that arrive together share one
round trip: the etcd call under way serves only callers that came before it started, and every
caller that comes while it runs shares the next one (etcd's own ReadIndex does the same for
its followers). One task, started with the read model's watch, makes the calls, so a caller
that goes away never strands the others.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import anyio

from cargohold.coordinator.etcd import EtcdError


class _Round:
    def __init__(self) -> None:
        self.done = anyio.Event()
        self.revision: int | None = None       # None: etcd did not answer in time


class ReadBarrier:
    def __init__(self, current_revision: Callable[[], Awaitable[int]], timeout: float = 1.0):
        self._current_revision = current_revision
        self._timeout = timeout
        self._next: _Round | None = None        # the round the callers arriving now will share
        self._demand = anyio.Event()
        self.round_trips = 0                   # etcd calls made, however many callers shared them

    async def revision(self) -> int | None:
        """etcd's revision read after this call began, or None if etcd did not answer in time."""
        if self._next is None:
            self._next = _Round()
            self._demand.set()
        current = self._next
        await current.done.wait()
        return current.revision

    async def run(self) -> None:
        """Make the round trips, one at a time, each for the callers that came before it."""
        while True:
            await self._demand.wait()
            self._demand = anyio.Event()
            current, self._next = self._next, None
            if current is None:
                continue
            with anyio.move_on_after(self._timeout):
                try:
                    current.revision = await self._current_revision()
                    self.round_trips += 1
                except EtcdError:
                    pass
            current.done.set()
