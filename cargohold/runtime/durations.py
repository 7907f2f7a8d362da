"""A bucketed count of durations, for code that must stay cheap and know no metrics library.

Components record into it (one bisect and two additions per observation); whoever exposes
metrics reads the buckets at scrape time (node/metrics.py turns them into a Prometheus histogram).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable


class DurationHistogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)    # the last one is above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a duration equal to a bound belongs to that bound's bucket ("le").
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) for every bound and then +Inf."""
        total, rows = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            rows.append((bound, total))
        return rows
