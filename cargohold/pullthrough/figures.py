"""What the pull-through cache counts, per remote repository: plain counters, read by the node's
`/metrics` at scrape time (node/metrics.py turns them into the `cargohold_pullthrough_*` series)
and published in the node's `status/<node>` record under "pullthrough" for `repo status`.

Keyed by the remote repository's name (`hub`), never the image: the cardinality stays bounded."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

REQUEST_RESULTS = ("hit", "miss", "revalidated", "stale", "error")
FILL_OUTCOMES = ("filled", "joined", "followed", "mismatch", "failed")


@dataclass
class RepositoryFigures:
    requests: Counter = field(default_factory=Counter)           # result -> answered requests
    upstream_requests: Counter = field(default_factory=Counter)  # (method, outcome) -> upstream calls
    upstream_bytes: int = 0                                      # bytes received from the upstream
    fills: Counter = field(default_factory=Counter)              # outcome -> blob fills

    def summary(self) -> dict[str, int]:
        """The figures `repo status` shows (summed over live nodes)."""
        return {
            "hits": self.requests["hit"], "misses": self.requests["miss"], "stale": self.requests["stale"],
            "revalidations": self.requests["revalidated"],
            "upstream_requests": sum(self.upstream_requests.values()),
            "upstream_errors": sum(n for (_, outcome), n in self.upstream_requests.items() if outcome != "ok"),
            "bytes_from_upstream": self.upstream_bytes,
        }


class CacheFigures:
    def __init__(self) -> None:
        self.repositories: dict[str, RepositoryFigures] = {}

    def of(self, repository: str) -> RepositoryFigures:
        figures = self.repositories.get(repository)
        if figures is None:
            figures = self.repositories[repository] = RepositoryFigures()
        return figures

    def request(self, repository: str, result: str) -> None:
        """A manifest or blob request answered: hit, miss, revalidated, stale or error."""
        self.of(repository).requests[result] += 1

    def upstream(self, repository: str, method: str, outcome: str, received: int = 0) -> None:
        """One call to the upstream (`outcome`: "ok" or the failure's short name) and its bytes."""
        figures = self.of(repository)
        figures.upstream_requests[(method, outcome)] += 1
        figures.upstream_bytes += received

    def fill(self, repository: str, outcome: str) -> None:
        self.of(repository).fills[outcome] += 1

    def status(self) -> dict[str, dict[str, int]]:
        """The "pullthrough" section of this node's status record."""
        return {name: figures.summary() for name, figures in sorted(self.repositories.items())}
