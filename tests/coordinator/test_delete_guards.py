"""Deletes must not break an image sideways (issue 12, items 4 and 5), against a real etcd.

A blob or child manifest that a manifest of the same repository references cannot be unlinked or
deleted; and a delete by digest whose read is overtaken by a new tag (pushed through another
node) must not go through on the strength of that stale read. The interleavings are forced: a
hook runs the competing write between the delete's reads and its transaction.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from contextlib import asynccontextmanager

import anyio
import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.keys import Keys
from cargohold.coordinator.metadata import ClusterMetadata, Referenced, TagProtected
from cargohold.coordinator.records import ManifestRecord

pytestmark = pytest.mark.anyio

REPO = "team/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture
def anyio_backend():
    return "trio"


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@asynccontextmanager
async def cluster_metadata(etcd, nodes=("a",), *, raw: list | None = None):
    """ClusterMetadata instances of one fresh cluster (one per node), each following its watch.
    `raw`, when given, receives the etcd client and the cluster's Keys (for writes no node makes)."""
    cluster = f"guards-{uuid.uuid4().hex[:8]}"
    async with EtcdClient([etcd.url]) as client, anyio.create_task_group() as tg:
        instances = [ClusterMetadata(client, cluster, node) for node in nodes]
        for metadata in instances:
            await tg.start(metadata.run)
        if raw is not None:
            raw.extend((client, Keys(cluster)))
        yield instances
        tg.cancel_scope.cancel()


async def put_image(metadata: ClusterMetadata, name: str, tag: str | None = None, *, subject: str | None = None):
    """Record a config and a layer in REPO and a manifest referencing them; returns (manifest, config, layer)."""
    config, layer, manifest = digest(f"{name}-config"), digest(f"{name}-layer"), digest(f"{name}-manifest")
    await metadata.record_blob(REPO, config, 10)
    await metadata.record_blob(REPO, layer, 100)
    await metadata.record_blob(REPO, manifest, 300)
    record = ManifestRecord(OCI_MANIFEST, 300, (config, layer), (), subject, None, time.time())
    await metadata.put_manifest(REPO, manifest, record, tag)
    return manifest, config, layer


async def put_index(metadata: ClusterMetadata, name: str, children: tuple[str, ...], tag: str | None = None) -> str:
    index = digest(f"{name}-index")
    await metadata.record_blob(REPO, index, 200)
    await metadata.put_manifest(REPO, index, ManifestRecord(OCI_INDEX, 200, (), children, None, None, time.time()), tag)
    return index


def interleave(metadata: ClusterMetadata, competing_write):
    """Run `competing_write` once, right before `metadata`'s next transaction: after its reads."""
    original = metadata._txn

    async def txn_after_competing_write(*args, **kwargs):
        metadata._txn = original
        await competing_write()
        return await original(*args, **kwargs)

    metadata._txn = txn_after_competing_write


async def test_a_referenced_blob_cannot_be_unlinked_until_its_manifest_is_gone(etcd):
    async with cluster_metadata(etcd) as (metadata,):
        manifest, config, layer = await put_image(metadata, "img", "latest")
        for blob in (config, layer, manifest):   # a manifest's own bytes are not unlinked sideways either
            with pytest.raises(Referenced) as refused:
                await metadata.unlink_blob(REPO, blob)
            assert refused.value.by == manifest
        assert await metadata.blob_in_repo(REPO, layer) is not None
        assert await metadata.delete_manifest(REPO, manifest)
        assert await metadata.unlink_blob(REPO, layer)
        assert not await metadata.unlink_blob(REPO, layer)             # already gone: unknown


async def test_an_unreferenced_blob_is_unlinked(etcd):
    async with cluster_metadata(etcd) as (metadata,):
        await put_image(metadata, "img")
        loose = digest("loose")
        await metadata.record_blob(REPO, loose, 5)
        assert await metadata.unlink_blob(REPO, loose)
        assert await metadata.blob_in_repo(REPO, loose) is None


async def test_a_child_manifest_cannot_be_deleted_while_its_index_exists(etcd):
    async with cluster_metadata(etcd) as (metadata,):
        child, _, _ = await put_image(metadata, "child")
        index = await put_index(metadata, "idx", (child,), "v1")
        with pytest.raises(Referenced) as refused:
            await metadata.delete_manifest(REPO, child)
        assert refused.value.by == index
        assert await metadata.manifest(REPO, child) is not None
        assert await metadata.delete_manifest(REPO, index)
        assert await metadata.delete_manifest(REPO, child)


async def test_an_index_pushed_after_the_deletes_read_stops_the_delete(etcd):
    async with cluster_metadata(etcd, ("a", "b")) as (a, b):
        child, _, _ = await put_image(a, "child")
        await b.wait_for_revision(a.revision(), 5)
        interleave(a, lambda: put_index(b, "idx", (child,), "v1"))
        with pytest.raises(Referenced):
            await a.delete_manifest(REPO, child)
        assert await a.manifest(REPO, child) is not None


async def test_a_referrer_does_not_keep_its_subject(etcd):
    """Subjects stay deletable (the spec lets referrers outlive them; the GC collects them)."""
    async with cluster_metadata(etcd) as (metadata,):
        subject, _, _ = await put_image(metadata, "subject", "latest")
        await put_image(metadata, "signature", subject=subject)
        assert await metadata.delete_manifest(REPO, subject)


async def test_a_tag_pushed_after_the_deletes_read_is_deleted_with_the_manifest(etcd):
    """The realistic interleaving: a tag push through another node (it rewrites the manifest record
    too, so the manifest's own guard also sees it; the next test removes that crutch)."""
    async with cluster_metadata(etcd, ("a", "b")) as (a, b):
        manifest, _, _ = await put_image(a, "img")
        record = await a.manifest(REPO, manifest)
        await b.wait_for_revision(a.revision(), 5)
        interleave(a, lambda: b.put_manifest(REPO, manifest, record, "v1"))
        assert await a.delete_manifest(REPO, manifest)
        assert await a.resolve_tag(REPO, "v1") is None
        assert await a.manifest(REPO, manifest) is None


async def test_a_bare_tag_write_after_the_deletes_read_fails_its_transaction(etcd):
    """The guard is on the repository's tag range itself, not on the manifest a tag push rewrites
    today: a writer that only sets a tag key (none exists yet) is caught just the same."""
    raw = []
    async with cluster_metadata(etcd, raw=raw) as (metadata,):
        client, keys = raw
        manifest, _, _ = await put_image(metadata, "img")
        interleave(metadata, lambda: client.put(keys.tag(REPO, "v1"), manifest.encode()))
        assert await metadata.delete_manifest(REPO, manifest)
        assert await client.get(keys.tag(REPO, "v1")) is None, "the tag written after the read was left dangling"
        assert await client.get(keys.manifest(REPO, manifest)) is None


async def test_a_protected_tag_pushed_after_the_deletes_read_refuses_the_delete(etcd):
    async with cluster_metadata(etcd, ("a", "b")) as (a, b):
        manifest, _, _ = await put_image(a, "img", "latest")
        record = await a.manifest(REPO, manifest)
        await b.wait_for_revision(a.revision(), 5)
        interleave(a, lambda: b.put_manifest(REPO, manifest, record, "v1"))
        asked = []

        def may_remove_tag(tag: str) -> bool:
            asked.append(tag)
            return not tag.startswith("v")

        with pytest.raises(TagProtected) as refused:
            await a.delete_manifest(REPO, manifest, may_remove_tag)
        assert refused.value.tag == "v1"
        assert asked[0] == "latest" and "v1" in asked          # judged again on the fresh read
        assert await a.resolve_tag(REPO, "v1") == manifest
        assert await a.resolve_tag(REPO, "latest") == manifest
        assert await a.manifest(REPO, manifest) is not None
