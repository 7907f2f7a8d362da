"""A node's own copy record counts as soon as its transaction returns, before the watch brings it
back, so a reconcile woken in between does not write it again; once the read model has passed
that revision, the model alone decides (a record withdrawn since is gone)."""

from __future__ import annotations

import hashlib
import uuid

import anyio
import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata

pytestmark = pytest.mark.anyio


async def test_an_own_copy_record_counts_until_the_model_has_seen_it(etcd):
    cluster = f"own-{uuid.uuid4().hex[:8]}"
    digest = "sha256:" + hashlib.sha256(b"own copy").hexdigest()
    async with EtcdClient([etcd.url]) as client:
        writer = ClusterMetadata(client, cluster, "n1")
        node = ClusterMetadata(client, cluster, "n2")       # its watch is not running yet
        async with anyio.create_task_group() as tg:
            await tg.start(writer.run)
            await writer.record_blob("r/app", digest, 100)
            assert not node.publishes_copy(digest)
            assert await node.record_copy(digest)
            assert "n2" not in node.holders(digest)             # the model has not seen it ...
            assert node.publishes_copy(digest)                  # ... but the node knows it wrote it

            await tg.start(node.run)                            # now the model catches up
            assert await node.catch_up(5.0)
            assert "n2" in node.holders(digest) and node.publishes_copy(digest)

            assert await writer.withdraw_copy(digest, "n2", [])   # withdrawn by another node
            assert await node.catch_up(5.0)
            assert not node.publishes_copy(digest)
            tg.cancel_scope.cancel()
