"""The garbage collector's state in etcd: leadership, run records, the sweep's guarded
transactions, the paged snapshot read and the clearing of released tombstones.

`cargohold.gc.collector` decides what to do; this module is the only place that says how it
is written. Every write a leader makes is guarded by its leadership: the leader key still
exists with the create revision it got when this node won it. A key that went with our lease,
or that another node created since, fails that guard, and the write raises `LostLeadership`
instead of changing anything. (A leader frozen mid-sweep and resumed after another node had
finished the run used to overwrite the finished record: the guard makes that impossible in
etcd itself, whatever the stale leader's read model still believes.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import anyio

from cargohold.coordinator.etcd import Compare, Delete, Get, KeyValue, Put, TxnResult
from cargohold.coordinator.metadata import VISIBILITY_TIMEOUT, ClusterMetadata
from cargohold.coordinator.records import BlobRecord, ManifestRecord, Snapshot

SNAPSHOT_SECTIONS = ("manifests", "tags", "blobs")


class LostLeadership(Exception):
    """The leader key is no longer the one this node created: the write was not made."""


@dataclass(frozen=True)
class Leadership:
    """What this node won: the lease its leader key is bound to, and that key's create
    revision (which no later leader key can have)."""

    lease: int
    revision: int


# A sweep candidate: (digest, the mod revision of its record that the mark saw, size).
DeadBlob = tuple[str, int, int]


class GcState:
    def __init__(self, metadata: ClusterMetadata):
        self.metadata = metadata
        self.node_id = metadata.node_id
        self._client = metadata.client
        self._keys = metadata.keys

    # ------------------------------------------------------------------ leadership
    async def campaign(self, lease: int) -> Leadership | None:
        """Create the leader key, bound to `lease`, unless some node holds it."""
        key = self._keys.gc_leader()
        result = await self._client.txn([Compare.missing(key)], [Put(key, self.node_id.encode(), lease=lease)])
        if not result.succeeded:
            return None
        await self.metadata.wait_for_revision(result.revision, VISIBILITY_TIMEOUT)
        return Leadership(lease, result.revision)

    def holds(self, leadership: Leadership) -> bool:
        """Whether the read model still shows this node leading under `leadership` (a cheap
        early answer; only the guard of each write is authoritative)."""
        return self.metadata.gc_leader() == self.node_id and self.metadata.lease == leadership.lease

    def _guard(self, leadership: Leadership) -> Compare:
        # The create revision, not the value (our node id) nor the lease: a node that lost its
        # lease and won again holds a new key, and its old run must not write under it.
        return Compare(self._keys.gc_leader(), "create", "==", leadership.revision)

    async def _txn(self, leadership: Leadership, compare: list, success: list) -> TxnResult:
        """`compare` and the leadership guard, then `success`; raises LostLeadership when it
        was the leadership guard that failed (the failure branch reads the leader key)."""
        leader_key = self._keys.gc_leader()
        result = await self._client.txn([self._guard(leadership), *compare], success, [Get(leader_key)])
        self.metadata.txn_count += 1
        if not result.succeeded:
            found: list[KeyValue] = result.responses[-1] or []
            if not found or found[0].create_revision != leadership.revision:
                raise LostLeadership()
        return result

    # ------------------------------------------------------------------ run records
    async def put_run(self, run: dict, leadership: Leadership, *, visible: bool = False) -> None:
        """Write the run record while this node leads; with `visible`, return once the read
        model shows it."""
        result = await self._txn(leadership, [], [Put(self._keys.gc_run(run["id"]), _encode(run))])
        if visible:
            await self.metadata.wait_for_revision(result.revision, VISIBILITY_TIMEOUT)

    # ------------------------------------------------------------------ mark input
    async def read_snapshot(self, revision: int | None = None) -> Snapshot:
        """Manifests, tags and blob records read from etcd at one revision (now, by default),
        in bounded pages."""
        revision = revision or await self._client.current_revision()
        snapshot = Snapshot(revision)
        for section in SNAPSHOT_SECTIONS:
            async for kvs in self._client.iter_prefix(self._keys.section_prefix(section), revision=revision):
                for kv in kvs:
                    self._add_to_snapshot(snapshot, kv)
        return snapshot

    def _add_to_snapshot(self, snapshot: Snapshot, kv: KeyValue) -> None:
        parsed = self._keys.parse(kv.key)
        if parsed.kind == "manifest":
            snapshot.manifests[(parsed.repo, parsed.digest)] = (ManifestRecord.decode(kv.value), kv.mod_revision)
        elif parsed.kind == "tag":
            snapshot.tags[(parsed.repo, parsed.name)] = kv.value.decode()
        elif parsed.kind == "blob":
            snapshot.blobs[parsed.digest] = (BlobRecord.decode(kv.value), kv.mod_revision)

    # ------------------------------------------------------------------ sweep
    async def sweep_manifest(self, repo: str, digest: str, revision: int, leadership: Leadership) -> bool:
        """Delete a dead manifest, its repository link and its reverse references, only if its
        record is still the one the mark saw and nothing in the repository refers to it."""
        keys = self._keys
        kv = await self._client.get(keys.manifest(repo, digest))
        if kv is None or kv.mod_revision != revision:
            return False          # re-pushed or re-tagged since the mark: alive after all
        record = ManifestRecord.decode(kv.value)
        result = await self._txn(
            leadership,
            [Compare.mod_revision_equals(kv.key, revision),
             Compare.none_with_prefix(f"{keys.refs_prefix(digest)}{repo}@")],
            [Delete(kv.key), Delete(keys.blob_in(digest, repo)),
             *(Delete(keys.ref(child, repo, digest)) for child in dict.fromkeys(record.references()))])
        return result.succeeded

    def _tombstone_ops(self, blob: DeadBlob, run_id: str) -> tuple[list, list]:
        """The re-check of one dead blob (its record unchanged since the mark, no reverse
        reference) and its tombstone: the tombstone, the record and the repository links go
        in one step, and the copies the blob had are read back (what the run will free)."""
        keys = self._keys
        digest, revision, _ = blob
        guard = [Compare.mod_revision_equals(keys.blob(digest), revision),
                 Compare.none_with_prefix(keys.refs_prefix(digest))]
        ops = [Put(keys.tombstone(digest), run_id.encode()), Delete(keys.blob(digest)),
               Delete(keys.blob_in_prefix(digest), prefix=True), Get(keys.blob_at(digest, ""), prefix=True)]
        return guard, ops

    def _condemned_copies(self, blob: DeadBlob, found: list[KeyValue] | None) -> frozenset[str]:
        """The nodes that held a copy when the tombstone was written (the Get among its ops)."""
        prefix = self._keys.blob_at(blob[0], "")
        return frozenset(kv.key[len(prefix):] for kv in found or ())

    async def tombstone_blobs(self, batch: list[DeadBlob], run_id: str,
                              leadership: Leadership) -> dict[str, frozenset[str]] | None:
        """Tombstone a batch in one transaction: digest -> the nodes that held a copy, or None
        when some blob's re-check failed (the caller then goes blob by blob)."""
        compare, success = [], []
        for blob in batch:
            guard, ops = self._tombstone_ops(blob, run_id)
            compare += guard
            success += ops
        result = await self._txn(leadership, compare, success)
        if not result.succeeded:
            return None
        per_blob = len(success) // len(batch)
        return {blob[0]: self._condemned_copies(blob, result.responses[(i + 1) * per_blob - 1])
                for i, blob in enumerate(batch)}

    async def tombstone_blob(self, blob: DeadBlob, run_id: str, leadership: Leadership) -> frozenset[str] | None:
        """Tombstone one blob: the nodes that held a copy, or None if its re-check failed."""
        guard, ops = self._tombstone_ops(blob, run_id)
        result = await self._txn(leadership, guard, ops)
        return self._condemned_copies(blob, result.responses[-1]) if result.succeeded else None

    # ------------------------------------------------------------------ retention
    async def delete_tag(self, repo: str, tag: str, digest: str, leadership: Leadership) -> bool:
        """Delete a tag that retention selected, only while it still points at `digest` (what
        the plan saw). Raises TagImmutable for a tag an immutable rule protects."""
        key = self._keys.tag(repo, tag)
        self.metadata._refuse_immutable(repo, [key])
        result = await self._txn(leadership, [Compare.value_equals(key, digest.encode())], [Delete(key)])
        if result.succeeded:
            await self.metadata.wait_for_revision(result.revision, VISIBILITY_TIMEOUT)
        return result.succeeded

    # ------------------------------------------------------------------ cleanup
    async def clear_tombstones(self, tombstones: dict[str, str], leadership: Leadership,
                               concurrency: int = 256) -> int:
        """Clear the tombstones (digest -> run id) whose blob has no key left, sharing
        transactions with other nodes' small writes; returns how many were cleared, once the
        read model has seen them go (so what is left is counted after the clears)."""
        items = iter(list(tombstones.items()))
        cleared, latest = 0, 0
        guard = self._guard(leadership)

        async def clear_some() -> None:
            nonlocal cleared, latest
            for digest, run_id in items:          # one iterator shared by the workers
                # The clearing a holder makes (ClusterMetadata.clear_tombstone), plus our guard.
                compare, ops = self.metadata._tombstone_clearing(digest, run_id)
                result = await self.metadata._grouped([guard, *compare], ops)
                if result.succeeded:
                    cleared += 1
                    latest = max(latest, result.revision)

        async with anyio.create_task_group() as tg:
            for _ in range(min(concurrency, len(tombstones))):
                tg.start_soon(clear_some)
        if latest:
            await self.metadata.wait_for_revision(latest, VISIBILITY_TIMEOUT)
        return cleared


def _encode(run: dict) -> bytes:
    return json.dumps(run, separators=(",", ":")).encode()
