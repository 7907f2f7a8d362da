"""Blobs chosen by where rendezvous placement puts them, so a test always gets the case it is about.

Placement is a pure function of the digest and the member list (`cargohold.replication.placement`),
so a test can pick content whose owners are known before it pushes anything, instead of pushing
until placement happens to cooperate (and skipping when it never does).
"""

from __future__ import annotations

import itertools
from typing import Iterable

from cargohold.replication.placement import owners
from tests.support import oci


def blob_owned_by(wanted: Iterable[str], *, members: Iterable[str], replicas: int, size: int,
                  seed: str) -> bytes:
    """Content of `size` bytes whose owners among `members` are exactly `wanted` (same seed, same bytes)."""
    wanted, members = set(wanted), list(members)
    prefix = oci.random_bytes(size - 8, seed=seed)
    for n in itertools.count():      # only the last 8 bytes vary: one big random draw, cheap retries
        data = prefix + n.to_bytes(8, "big")
        if set(owners(oci.digest(data), members, replicas)) == wanted:
            return data
