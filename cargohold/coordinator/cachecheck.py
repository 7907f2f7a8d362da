"""When the pull-through cache last confirmed a tag with its upstream: `cache/checked/<local
repo>/<tag>` -> `{"digest": .., "checked": unix time}`. Shared by the whole cluster, so that a tag
is revalidated with one upstream `HEAD` per ttl however many nodes serve it. The read model
ignores these keys: a check is read from etcd when this node's own memory of it is too old.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cargohold.coordinator.metadata import ClusterMetadata


@dataclass(frozen=True)
class TagCheck:
    digest: str
    checked: float      # unix time the upstream confirmed `digest` for the tag

    def fresh(self, ttl: float, now: float) -> bool:
        return now - self.checked < ttl


async def last_check(metadata: ClusterMetadata, repo: str, tag: str) -> TagCheck | None:
    kv = await metadata.client.get(metadata.keys.cache_checked(repo, tag))
    if kv is None:
        return None
    try:
        document = json.loads(kv.value)
        return TagCheck(str(document["digest"]), float(document["checked"]))
    except (ValueError, KeyError, TypeError):
        return None     # unreadable: as if never checked (the next check overwrites it)


async def record_check(metadata: ClusterMetadata, repo: str, tag: str, check: TagCheck) -> None:
    value = json.dumps({"digest": check.digest, "checked": check.checked}).encode()
    await metadata.client.put(metadata.keys.cache_checked(repo, tag), value)
