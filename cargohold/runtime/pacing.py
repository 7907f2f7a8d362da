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


class TokenAccount:
    """The arithmetic of a token bucket, without waiting: `rate` tokens a second, at most
    `capacity` saved up. `debit` takes tokens (the balance may go negative: concurrent takers
    queue behind the deficit) and says how long the taker must wait for its share."""

    def __init__(self, rate: float, capacity: float):
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def debit(self, amount: float) -> float:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= amount
        return max(-self.tokens, 0.0) / self.rate

    def refill(self) -> None:
        self.tokens, self.updated = self.capacity, time.monotonic()


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
        self._account = TokenAccount(rate, rate * self.BURST) if rate else None

    async def take(self, units: int = 1) -> None:
        if self._account is None or self.foreground is None:
            return
        if not self.foreground.busy():
            self._account.refill()
            return
        wait = self._account.debit(units)
        if wait > 0:
            now = time.monotonic()
            tick = -(-(now + wait) // self.TICK) * self.TICK     # the first tick at or after it is due
            await anyio.sleep(tick - now)
