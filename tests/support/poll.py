"""One way for tests to wait for something the system does in the background.

A test waits for an outcome, never for a span of time: `until` (plain code) and `eventually`
(async code) call the check again and again until it holds. A check holds when it returns
something truthy; an AssertionError (or a refused connection) means "not yet", so a block of
asserts works too if it ends with `return True`. The timeout only turns a hang into a readable failure: it is generous
on purpose and never part of what a test asserts.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable

import anyio
import httpx

PATIENCE = 60.0          # seconds before a wait is reported as a failure (a hang, not a slow run)
RETRIED = (AssertionError, httpx.TransportError)


class _Deadline:
    def __init__(self, timeout: float, what: str):
        self.timeout, self.what = timeout, what
        self.end = time.monotonic() + timeout
        self.last: object = None

    def passed(self) -> bool:
        return time.monotonic() >= self.end

    def fail(self) -> AssertionError:
        return AssertionError(f"not true within {self.timeout:.0f}s: {self.what} (last: {self.last!r})")


def until(check: Callable[[], Any], *, timeout: float = PATIENCE, interval: float = 0.05,
          what: str = "condition") -> Any:
    """Call `check()` until it holds; return its last value."""
    deadline = _Deadline(timeout, what)
    while True:
        try:
            deadline.last = check()
            if deadline.last:
                return deadline.last
        except RETRIED as exc:
            deadline.last = exc
        if deadline.passed():
            raise deadline.fail()
        time.sleep(interval)


async def eventually(check: Callable[[], Any], *, timeout: float = PATIENCE, interval: float = 0.05,
                     what: str = "condition") -> Any:
    """Call `check()` (plain or async) until it holds; return its last value."""
    deadline = _Deadline(timeout, what)
    while True:
        try:
            result = check()
            deadline.last = await result if inspect.isawaitable(result) else result
            if deadline.last:
                return deadline.last
        except RETRIED as exc:
            deadline.last = exc
        if deadline.passed():
            raise deadline.fail()
        await anyio.sleep(interval)
