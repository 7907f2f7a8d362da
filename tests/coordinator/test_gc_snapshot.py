"""The GC's mark reads the leader's read model instead of etcd: it must be the very snapshot a
read of etcd at that revision gives (records, tags, and the mod revisions the sweep guards on)."""

from __future__ import annotations

import hashlib
import time
import uuid

import anyio
import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.gc.collector import GarbageCollector
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.coordinator.records import ManifestRecord

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "trio"


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


async def test_the_read_model_snapshot_equals_a_read_of_etcd(etcd):
    async with EtcdClient([etcd.url]) as client:
        metadata = ClusterMetadata(client, f"snap-{uuid.uuid4().hex[:8]}", "n1")
        async with anyio.create_task_group() as tg:
            await tg.start(metadata.run)
            for i in range(30):
                repo = f"team/app{i % 4}"
                layer, config = digest(f"layer{i}"), digest(f"config{i}")
                await metadata.record_blob(repo, layer, 100 + i)
                await metadata.record_blob(repo, config, 10)
                record = ManifestRecord("application/vnd.oci.image.manifest.v1+json", 300, (config, layer), (),
                                        None, None, time.time())
                await metadata.record_blob(repo, digest(f"m{i}"), 300)
                await metadata.put_manifest(repo, digest(f"m{i}"), record, f"v{i % 5}")   # tags move
            await metadata.delete_manifest("team/app1", digest("m5"))
            await metadata.delete_tag("team/app2", "v2")
            await metadata.record_blob("team/app0", digest("layer0"), 100)   # a re-upload rewrites the record

            collector = GarbageCollector(metadata)
            from_model = await collector.snapshot()
            from_etcd = await collector.state.read_snapshot()
            tg.cancel_scope.cancel()

    assert from_model.manifests == from_etcd.manifests and len(from_model.manifests) == 29
    assert from_model.tags == from_etcd.tags and from_model.tags
    assert from_model.blobs == from_etcd.blobs and len(from_model.blobs) == 90
    assert all(revision > 0 for _, revision in from_model.blobs.values())
    assert from_model.revision <= from_etcd.revision
