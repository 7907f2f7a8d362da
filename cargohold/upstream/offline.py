"""Artifactory's "assumed offline period", as pure bookkeeping with an injectable clock: after a
failure that means the upstream is down, callers fail fast for a while instead of each waiting for
the same connect or read timeout again. A success ends it early.

The tracker is one node's memory; an `OfflineBoard` shares it with the other nodes of the site
(implemented over etcd by `cargohold.coordinator.upstreamstate`)."""

from __future__ import annotations

import time
from typing import Callable, Protocol

from cargohold.upstream.errors import UpstreamUnavailable


class OfflineBoard(Protocol):
    async def posted(self) -> tuple[float, str] | None:
        """(seconds the upstream is still assumed offline, why), if another node said so."""

    async def post(self, remaining: float, reason: str) -> None:
        """Tell the others that this node found the upstream offline for `remaining` seconds."""


class OfflineTracker:
    def __init__(self, period: float, clock: Callable[[], float] = time.monotonic):
        if period < 0:
            raise ValueError("the offline period cannot be negative")
        self.period = period
        self._clock = clock
        self._until = 0.0
        self._reason = ""

    def failed(self, reason: str, at_least: float | None = None) -> None:
        """The upstream just failed; `at_least` stretches the period (a 429's `Retry-After`)."""
        period = max(self.period, at_least or 0.0)
        self._until = max(self._until, self._clock() + period)
        self._reason = reason

    def assume(self, remaining: float, reason: str) -> None:
        """Another node found the upstream offline: so is it here, for `remaining` seconds."""
        self._until = max(self._until, self._clock() + remaining)
        self._reason = reason

    @property
    def reason(self) -> str:
        return self._reason

    def succeeded(self) -> None:
        self._until = 0.0
        self._reason = ""

    def remaining(self) -> float:
        """Seconds the upstream is still assumed offline (0 when it is not)."""
        return max(0.0, self._until - self._clock())

    @property
    def offline(self) -> bool:
        return self.remaining() > 0

    def check(self) -> None:
        """Raise UpstreamUnavailable at once while the upstream is assumed offline."""
        remaining = self.remaining()
        if remaining > 0:
            raise UpstreamUnavailable(f"assumed offline for {remaining:.1f}s more after: {self._reason}")
