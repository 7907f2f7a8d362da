"""The cluster-wide claim on filling a blob from an upstream registry (`fills/<digest>`).

One node at a time fetches a given blob from upstream: it creates the claim in a transaction
that also checks the blob is not in the cluster yet, bound to its membership lease, so the
claim goes with the node if it dies. Other nodes wait for the claim to go: then either the
blob has been published (they link it) or the filler died (they claim it themselves). A fill
that fails says so in the claim before removing it, so that its waiters give up with the same
answer instead of each asking the upstream again.

`cargohold.pullthrough.fill` decides what to do; this module is the only place that says how
it is written. Functions take the node's ClusterMetadata, like `gcstate`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace

import anyio

from cargohold.coordinator.etcd import Compare, Delete, EtcdUnavailable, Get, Put
from cargohold.coordinator.metadata import ClusterMetadata

# How long a claim waits for the node's membership lease (granted at start, renewed after a loss).
LEASE_WAIT = 5.0


@dataclass(frozen=True)
class FillClaim:
    """The value of `fills/<digest>`: who fills it, for which repository, since when; and once
    the fill ended without publishing, how (`failed`: an outcome such as "mismatch") and why."""

    node: str
    repo: str
    started: float
    failed: str | None = None
    reason: str | None = None

    def encode(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "FillClaim":
        document = json.loads(raw)
        return cls(str(document.get("node", "")), str(document.get("repo", "")), float(document.get("started", 0)),
                   document.get("failed"), document.get("reason"))


@dataclass(frozen=True)
class ClaimAnswer:
    """What one claim attempt found, as of etcd `revision`: exactly one of
    `won` (this node fills), `linked_in` (a repository that already has the blob: no fill
    needed) or `held` (another fill's claim)."""

    revision: int
    won: FillClaim | None = None
    linked_in: str | None = None
    held: FillClaim | None = None


async def claim_fill(metadata: ClusterMetadata, digest: str, repo: str) -> ClaimAnswer:
    """Claim the fill of `digest` for `repo`, unless a repository of the cluster links the blob
    or another claim stands: one transaction decides between the three."""
    lease = await _current_lease(metadata)
    keys = metadata.keys
    key, linked = keys.fill(digest), keys.blob_in_prefix(digest)
    claim = FillClaim(metadata.node_id, repo, time.time())
    result = await metadata.client.txn(
        [Compare.missing(key), Compare.none_with_prefix(linked)],
        [Put(key, claim.encode(), lease=lease)],
        [Get(key), Get(linked, prefix=True)])
    metadata.txn_count += 1
    if result.succeeded:
        return ClaimAnswer(result.revision, won=claim)
    held, links = result.responses
    if links:
        return ClaimAnswer(result.revision, linked_in=links[0].key[len(linked):])
    return ClaimAnswer(result.revision, held=FillClaim.decode(held[0].value))


async def release_fill(metadata: ClusterMetadata, digest: str, claim: FillClaim,
                       failed: str | None = None, reason: str | None = None) -> None:
    """Remove our claim (only ours: a claim that went with a lost lease may be another node's
    by now). With `failed`, first say in the claim how the fill ended, so its waiters learn it."""
    key = metadata.keys.fill(digest)
    ours = Compare.value_equals(key, claim.encode())
    if failed is not None and metadata.lease is not None:
        ended = replace(claim, failed=failed, reason=reason)
        result = await metadata.client.txn([ours], [Put(key, ended.encode(), lease=metadata.lease)])
        if not result.succeeded:
            return
        ours = Compare.value_equals(key, ended.encode())
    await metadata.client.txn([ours], [Delete(key)])
    metadata.txn_count += 1


async def wait_for_release(metadata: ClusterMetadata, digest: str, revision: int) -> FillClaim | None:
    """Until the claim on `digest` seen at `revision` goes: None when it is gone (the blob was
    published, or the filler died and its lease took the claim), the claim with `failed` set when
    the fill failed. The caller bounds the wait."""
    key = metadata.keys.fill(digest)
    async with metadata.client.watch_prefix(key, start_revision=revision + 1) as watch:
        async for batch in watch:
            for event in batch.events:
                if event.key != key:
                    continue
                if event.type == "delete":
                    return None
                claim = FillClaim.decode(event.value)
                if claim.failed is not None:
                    return claim
    return None


async def _current_lease(metadata: ClusterMetadata) -> int:
    with anyio.move_on_after(LEASE_WAIT):
        while metadata.lease is None:
            await metadata.lease_granted.wait()
    if metadata.lease is None:
        raise EtcdUnavailable("no membership lease to bind a fill claim to")
    return metadata.lease
