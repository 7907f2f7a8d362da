"""Failed-login limiting (issue 6): at most N failures per window, per client and per account.

A sliding window of failure times per key. While a key is over its limit every login attempt
for it is refused with 429 TOOMANYREQUESTS and `Retry-After` (the password is not even
checked, so guessing stops), until its oldest failure leaves the window. Pure logic with an
injectable clock; each node keeps its own counts (in memory, not shared through etcd).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from cargohold.units import parse_rate


class FailureLimiter:
    def __init__(self, limit: int, window: float, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    @classmethod
    def from_rate(cls, text: str, **kwargs) -> "FailureLimiter":
        limit, window = parse_rate(text)
        return cls(limit, window, **kwargs)

    def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may try again, or None if it may try now."""
        times = self._failures.get(key)
        if times is None:
            return None
        now = self.clock()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        if len(times) < self.limit:
            return None
        return times[0] + self.window - now

    def failed(self, key: str) -> None:
        if key not in self._failures and len(self._failures) >= self.max_keys:
            self._prune()
        times = self._failures.setdefault(key, deque())
        times.append(self.clock())
        while len(times) > self.limit:
            times.popleft()

    def _prune(self) -> None:
        """Keep memory bounded when many keys fail (random user names): drop the expired, then the oldest."""
        horizon = self.clock() - self.window
        self._failures = {k: t for k, t in self._failures.items() if t and t[-1] > horizon}
        if len(self._failures) >= self.max_keys:
            by_age = sorted(self._failures, key=lambda k: self._failures[k][-1])
            for key in by_age[: len(by_age) // 2]:
                del self._failures[key]
