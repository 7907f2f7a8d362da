"""Background work gives way to client requests.

Garbage collection condemns and releases blobs by the ten thousand; at full speed that work
takes the CPU and the etcd round trips that pushes and pulls are waiting for. While a node
serves clients, its background work therefore goes at a set pace; while it is idle, as fast
as it can. `Foreground` is what the HTTP API reports; `BackgroundPace` is what the workers
ask before each unit of work.
"""

from __future__ import annotations

import time

import anyio


class Foreground:
    """Client requests this node is serving now, or served within the last `linger` seconds."""

    def __init__(self, linger: float = 1.0):
        self.linger = linger
        self.in_flight = 0
        self._last_finished = float("-inf")

    def started(self) -> None:
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1
        self._last_finished = time.monotonic()

    def busy(self) -> bool:
        return self.in_flight > 0 or time.monotonic() - self._last_finished < self.linger


class BackgroundPace:
    """At most `rate` units of work per second while `foreground` is busy (bursts of one
    tick's worth); no limit while it is idle, or when `rate` is 0.

    Paced takers wake on ticks (every TICK seconds), all that are due together: their etcd
    writes then share transactions (group commit) instead of trickling out one by one,
    which would cost more per unit than the unpaced work it replaces.
    """

    TICK = 0.25
    BURST = TICK

    def __init__(self, foreground: Foreground | None, rate: float):
        self.foreground = foreground
        self.rate = float(rate)
        self._tokens = 0.0
        self._updated = time.monotonic()

    async def take(self, units: int = 1) -> None:
        now = time.monotonic()
        if not self.rate or self.foreground is None or not self.foreground.busy():
            self._tokens, self._updated = self.rate * self.BURST, now
            return
        self._tokens = min(self.rate * self.BURST, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= units          # concurrent takers queue up behind the deficit
        if self._tokens < 0:
            due = now + -self._tokens / self.rate
            tick = -(-due // self.TICK) * self.TICK          # the first tick at or after `due`
            await anyio.sleep(tick - now)
