"""What the pull-through cache keeps about its use, and the release of a cached image.

- Last-pulled times: `cache/pulled/<local repo>` -> unix time, written by each node's
  `pullthrough.usage.PullRecorder` for many images in one transaction (never one write per pull).
- Release: a cached image's tags and manifests are deleted (each manifest together with its
  reverse references and its repository link), so the next GC run frees the blobs nothing else
  references. The eviction (`pullthrough.usage.Evictor`) and `cargohold repo remove` decide what
  to release; this module is how it is written.

Every release transaction is guarded by "nothing of this image was written since the read"
(its tags, its manifests and its last-pulled time), so an image that is filled or pulled again
while it is being released is left as it is: released content never goes behind a pull's back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from cargohold.coordinator.etcd import Compare, Delete, KeyValue, Put
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.coordinator.records import ManifestRecord

# etcd refuses a transaction with more than --max-txn-ops operations per branch (default 128);
# our guards take three of them.
MAX_OPS = 120


@dataclass
class Released:
    """What a release of one cached image did."""

    repository: str
    tags: int = 0
    manifests: int = 0
    complete: bool = True      # False: it was written to meanwhile (in use again), the rest is kept

    def as_dict(self) -> dict:
        return {"repository": self.repository, "tags": self.tags, "manifests": self.manifests,
                "complete": self.complete}


class CacheUsage:
    def __init__(self, metadata: ClusterMetadata):
        self.metadata = metadata
        self._client = metadata.client
        self._keys = metadata.keys

    # ------------------------------------------------------------------ last-pulled times
    async def record_pulls(self, pulls: Mapping[str, float]) -> int:
        """Write the last-pulled time of each image (local name -> unix time): one transaction
        for up to MAX_OPS images. Returns how many transactions it took."""
        puts = [Put(self._keys.cache_pulled(name), _encode_time(when)) for name, when in sorted(pulls.items())]
        for start in range(0, len(puts), MAX_OPS):
            await self.metadata._txn([], puts[start:start + MAX_OPS], visible=False)
        return -(-len(puts) // MAX_OPS)

    async def last_pulls(self, namespace: str) -> dict[str, float]:
        """local name -> last recorded pull, for the cached images of remote repository `namespace`."""
        prefix = self._keys.cache_pulled_prefix(namespace)
        found = {}
        async for kvs in self._client.iter_prefix(prefix):
            for kv in kvs:
                found[f"{namespace}/{kv.key[len(prefix):]}"] = _decode_time(kv.value)
        return found

    def cached_images(self, namespace: str) -> dict[str, float]:
        """local name -> the creation time of its newest manifest, for every image cached under
        remote repository `namespace`, as the read model has them (no etcd read)."""
        images = {}
        for name, state in list(self.metadata.model.repos.items()):
            if name.startswith(namespace + "/") and state.manifests:
                images[name] = max(record.created for record in state.manifests.values())
        return images

    # ------------------------------------------------------------------ release
    async def release_image(self, repo: str) -> Released:
        """Delete the tags and manifests of cached image `repo` (not of images nested under it),
        its registration and its last-pulled time."""
        revision = await self._client.current_revision()
        tags = await self._direct_keys(self._keys.tags_prefix(repo), revision)
        manifests = await self._direct_keys(self._keys.manifest(repo, ""), revision)
        released = Released(repo)
        guard = self._unchanged(repo, revision)
        # Tags first: an interrupted release leaves untagged manifests, never a tag without its manifest.
        for batch, count in _batches([[Delete(kv.key)] for kv in tags]):
            if not await self._apply(guard, batch):
                released.complete = False
                return released
            released.tags += count
        # Indexes and referrers before what they point at: an interrupted release never leaves
        # an index whose child is gone.
        manifests.sort(key=lambda kv: not _points_at_others(kv))
        for batch, count in _batches([self._manifest_deletion(repo, kv) for kv in manifests]):
            if not await self._apply(guard, batch):
                released.complete = False
                return released
            released.manifests += count
        await self._apply(guard, [Delete(self._keys.repo(repo)), Delete(self._keys.cache_pulled(repo))])
        return released

    async def release_namespace(self, namespace: str) -> list[Released]:
        """Release every image cached under remote repository `namespace` (for `repo remove`)."""
        names: set[str] = set()
        for prefix in (self._keys.tags_prefix(namespace), self._keys.manifest(namespace, "")):
            async for kvs in self._client.iter_prefix(prefix, keys_only=True):
                names.update(self._keys.parse(kv.key).repo for kv in kvs)
        released = [await self.release_image(name) for name in sorted(names)]
        await self.metadata._txn([], [Delete(self._keys.cache_pulled_prefix(namespace), prefix=True),
                                      Delete(self._keys.repo(namespace) + "/", prefix=True)], visible=False)
        return released

    async def _direct_keys(self, prefix: str, revision: int) -> list[KeyValue]:
        """The keys right under `prefix` (a repository's own tags or manifests: tags and digests
        never contain '/', nested repositories' keys do)."""
        found = []
        async for kvs in self._client.iter_prefix(prefix, revision=revision):
            found.extend(kv for kv in kvs if "/" not in kv.key[len(prefix):])
        return found

    def _unchanged(self, repo: str, revision: int) -> list[Compare]:
        keys = self._keys
        return [Compare.unchanged_since(keys.tags_prefix(repo), revision),
                Compare.unchanged_since(keys.manifest(repo, ""), revision),
                Compare(keys.cache_pulled(repo), "mod", "<", revision + 1)]

    def _manifest_deletion(self, repo: str, kv: KeyValue) -> list:
        """One manifest, its repository link and its reverse references: always in one
        transaction, so a manifest never loses a reference that keeps its blobs from the GC."""
        keys = self._keys
        digest = kv.key.rpartition("/")[2]
        record = ManifestRecord.decode(kv.value)
        return [Delete(kv.key), Delete(keys.blob_in(digest, repo)),
                *(Delete(keys.ref(child, repo, digest)) for child in dict.fromkeys(record.references()))]

    async def _apply(self, guard: list[Compare], ops: list) -> bool:
        return (await self.metadata._txn(guard, ops, visible=False)).succeeded


def _points_at_others(kv: KeyValue) -> bool:
    record = ManifestRecord.decode(kv.value)
    return bool(record.children or record.subject)


def _batches(groups: list[list]) -> list[tuple[list, int]]:
    """Groups of operations packed into transactions of at most MAX_OPS operations (a bigger
    group goes alone), each with how many groups it holds. A group is never split."""
    batches: list[tuple[list, int]] = []
    current: list = []
    count = 0
    for group in groups:
        if current and len(current) + len(group) > MAX_OPS:
            batches.append((current, count))
            current, count = [], 0
        current.extend(group)
        count += 1
    return batches + ([(current, count)] if current else [])


def _encode_time(when: float) -> bytes:
    return json.dumps(round(when, 3)).encode()


def _decode_time(raw: bytes) -> float:
    try:
        return float(json.loads(raw))
    except (ValueError, TypeError):
        return 0.0
