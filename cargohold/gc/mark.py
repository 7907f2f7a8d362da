"""The mark phase of garbage collection, free of I/O: from one consistent snapshot of the
cluster's metadata, the live set and the sweep candidates.

Live: every tagged manifest; every untagged manifest unless `untagged_after` is set and it is
older than that; every child of a live index; every referrer (manifest whose subject is a
live manifest) in the same repository; every blob a live manifest references, and the
manifests' own bytes. A blob that nothing live references is a candidate once its hold
(creation, or the last HEAD/GET/mount/re-upload) is older than the grace period.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cargohold.coordinator.records import Snapshot


@dataclass
class MarkResult:
    revision: int
    live_manifests: set[tuple[str, str]]
    live_blobs: set[str]
    dead_manifests: list[tuple[str, str, int]]            # (repo, digest, mod revision)
    candidates: list[tuple[str, int, int]]                # (digest, mod revision, size)

    @property
    def candidate_bytes(self) -> int:
        return sum(size for _, _, size in self.candidates)


def mark(snapshot: Snapshot, now: float, grace: float, untagged_after: float | None) -> MarkResult:
    manifests = snapshot.manifests
    referrers: dict[tuple[str, str], list[str]] = {}
    for (repo, digest), (record, _) in manifests.items():
        if record.subject:
            referrers.setdefault((repo, record.subject), []).append(digest)

    roots = {(repo, digest) for (repo, _), digest in snapshot.tags.items() if (repo, digest) in manifests}
    if untagged_after is None:
        roots.update(manifests)
    else:
        roots.update(key for key, (record, _) in manifests.items() if record.created >= now - untagged_after)

    live: set[tuple[str, str]] = set()
    queue = deque(roots)
    while queue:
        key = queue.popleft()
        if key in live:
            continue
        live.add(key)
        repo, digest = key
        record = manifests[key][0]
        for child in record.children:
            if (repo, child) in manifests and (repo, child) not in live:
                queue.append((repo, child))
        for referrer in referrers.get(key, ()):
            if (repo, referrer) not in live:
                queue.append((repo, referrer))

    live_blobs: set[str] = set()
    for repo, digest in live:
        live_blobs.add(digest)
        live_blobs.update(manifests[(repo, digest)][0].blobs)

    dead = [(repo, digest, rev) for (repo, digest), (_, rev) in manifests.items() if (repo, digest) not in live]
    cutoff = now - grace
    candidates = [(digest, rev, record.size) for digest, (record, rev) in snapshot.blobs.items()
                  if digest not in live_blobs and record.held_since < cutoff]
    return MarkResult(snapshot.revision, live, live_blobs, sorted(dead), sorted(candidates))
