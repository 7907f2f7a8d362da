"""Let a test see the GC's grace period pass without sleeping it out.

Nodes write the times that the grace period is measured from: a blob record's `created` and
`touched` (its hold), a manifest record's `created` (for `untagged_after` and retention). A
test cannot set a node process's clock, so it moves those times back in etcd, exactly as if
the records had been written that long ago. Each record is rewritten only if it has not
changed since it was read (a guarded transaction), like any other writer of it; its mod
revision changes as with a HEAD that refreshes a hold, so a sweep decided earlier would fail.
"""

from __future__ import annotations

import dataclasses

from cargohold.coordinator.etcd import Compare, EtcdClient, Put
from cargohold.coordinator.keys import Keys
from cargohold.coordinator.records import BlobRecord, ManifestRecord

HOURS = 3600.0
PAST_GRACE = 2 * HOURS        # the default grace period is one hour


def _older(kind: str, raw: bytes, seconds: float) -> bytes | None:
    if kind == "blob":
        record = BlobRecord.decode(raw)
        touched = record.touched - seconds if record.touched else 0.0
        return BlobRecord(record.size, record.created - seconds, touched).encode()
    if kind == "manifest":
        record = ManifestRecord.decode(raw)
        return dataclasses.replace(record, created=record.created - seconds).encode()
    return None


async def age(cluster, seconds: float = PAST_GRACE) -> int:
    """Make every blob and manifest record of the cluster `seconds` older; returns how many."""
    keys = Keys(cluster.name)
    aged = 0
    async with EtcdClient([cluster.etcd_url]) as etcd:
        for section in ("blobs", "manifests"):
            async for kvs in etcd.iter_prefix(keys.section_prefix(section)):
                for kv in kvs:
                    older = _older(keys.parse(kv.key).kind, kv.value, seconds)
                    if older is None:
                        continue
                    result = await etcd.txn([Compare.mod_revision_equals(kv.key, kv.mod_revision)],
                                            [Put(kv.key, older)])
                    aged += result.succeeded
    return aged
