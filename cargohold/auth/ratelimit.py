"""Failed-login limiting (issue 6): at most N failures per window, per client and per account.

A sliding window of failure times per key. While a key is over its limit every login attempt
for it is refused with 429 TOOMANYREQUESTS and `Retry-After` (the password is not even
checked, so guessing stops), until its oldest failure leaves the window. Pure logic with an
injectable clock; each node keeps its own counts (in memory, not shared through etcd).

So that guessing at an account does not lock its owners out, `RecentLogins` remembers from
which addresses each account logged in successfully lately: those addresses are exempt from
the per-account limit (never from the per-address one). Only successful logins are
remembered, so an attacker cannot fill it without the credentials, and it is bounded anyway.
An operator lifts a lock at once with `cargohold user unlock NAME` (`FailureLimiter.clear`).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
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

    def clear(self, key: str) -> None:
        """Forget the failures of `key` (an operator unlocked it)."""
        self._failures.pop(key, None)

    def _prune(self) -> None:
        """Keep memory bounded when many keys fail (random user names): drop the expired, then the oldest."""
        horizon = self.clock() - self.window
        self._failures = {k: t for k, t in self._failures.items() if t and t[-1] > horizon}
        if len(self._failures) >= self.max_keys:
            by_age = sorted(self._failures, key=lambda k: self._failures[k][-1])
            for key in by_age[: len(by_age) // 2]:
                del self._failures[key]


class RecentLogins:
    """Addresses each account logged in from successfully within `ttl` seconds (the caller keys
    accounts by name and credentials, so a password change starts afresh): at most
    `per_account` addresses per account (the most recent) and `max_accounts` accounts (the most
    recently active)."""

    def __init__(self, ttl: float = 7 * 24 * 3600.0, *, per_account: int = 32, max_accounts: int = 50_000,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.per_account = per_account
        self.max_accounts = max_accounts
        self.clock = clock
        self._seen: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()

    def succeeded(self, account: str, client: str) -> None:
        addresses = self._seen.pop(account, None) or OrderedDict()
        self._seen[account] = addresses                  # most recently active last
        addresses.pop(client, None)
        addresses[client] = self.clock()
        while len(addresses) > self.per_account:
            addresses.popitem(last=False)
        while len(self._seen) > self.max_accounts:
            self._seen.popitem(last=False)

    def knows(self, account: str, client: str) -> bool:
        seen = self._seen.get(account, {}).get(client)
        return seen is not None and seen > self.clock() - self.ttl
