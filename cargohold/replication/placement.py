"""Where a blob lives: rendezvous (highest-random-weight) hashing, free of I/O.

Every node computes the same owners from the same member list, with no coordination; when a
node joins or leaves, only the blobs whose top-N set changes move (about 1/N of them).
"""

from __future__ import annotations

import hashlib
from typing import Iterable


def _score(node_id: str, digest: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{node_id}\x00{digest}".encode(), digest_size=8).digest(), "big")


def owners(digest: str, candidates: Iterable[str], replicas: int) -> list[str]:
    """The `replicas` nodes (fewer if there are fewer candidates) that should hold `digest`."""
    ranked = sorted(candidates, key=lambda node: _score(node, digest), reverse=True)
    return ranked[:max(replicas, 1)]


def preference(digest: str, holders: Iterable[str], *, me: str, same_site: set[str]) -> list[str]:
    """Order the holders of a copy to read from: this node, then its site, then the rest.

    Within each group the rendezvous order spreads reads for one blob across its holders
    consistently, so one hot blob is not read from every holder at once.
    """
    holders = list(holders)
    ranked = sorted(holders, key=lambda node: _score(node, digest), reverse=True)
    return sorted(ranked, key=lambda node: 0 if node == me else (1 if node in same_site else 2))
