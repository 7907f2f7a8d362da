"""A local copy found missing or corrupt: the one way a node gives it up.

Used by the read path (the HTTP API) and by the scrub after GC runs (`cargohold.gc.node_sweep`),
which are siblings that may not import each other, so it lives below both.
"""

from __future__ import annotations

import logging

from cargohold.blobs.store import BlobStore
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.oci.reference import Digest

log = logging.getLogger("cargohold.replication")


async def withdraw_damaged_copy(metadata: ClusterMetadata, store: BlobStore, digest: Digest, reason: str) -> None:
    """Stop advertising this node's copy, then delete what is left of the file, under the
    digest's lock. Peers then read from the other holders, and placement, which still names
    this node an owner, has it fetch a verified copy again (the file must go: a reconcile that
    found a file of the right size would publish it as it is)."""
    async with store.locked(digest):
        await metadata.forget_copy(str(digest))
        await store.delete(digest)
    log.warning("local copy of %s withdrawn (%s): peers serve it until it is fetched again", digest, reason)
