"""Blobs of a remote repository through a node: a miss streams from engine-blobs' fill, after
which the blob is an ordinary blob of the cluster, served without asking the upstream."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.pullthrough.conftest import REPO, remote
from tests.support.oci import push_blob, random_bytes
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio


async def test_cache_blobs_filled_once_then_served_from_the_cluster(etcd, cluster_name, client, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=3600)
    name = f"{hub.name}/{REPO}"
    assert (await client.get(f"/v2/{name}/manifests/v1")).status_code == 200
    for digest, data in upstream.image.blobs.items():
        fetched_before = upstream.count(f"/blobs/{digest}", "GET")
        first = await client.get(f"/v2/{name}/blobs/{digest}")
        assert first.status_code == 200, first.text
        assert first.content == data and first.headers["x-cargohold-cache"] == "miss"

        # until it is published, another GET joins the fill (a miss too)
        again = await eventually(lambda: _hit(client, f"/v2/{name}/blobs/{digest}"),
                                 what="the filled blob published in the cluster")
        assert again.content == data
        part = await client.get(f"/v2/{name}/blobs/{digest}", headers={"Range": "bytes=1-10"})
        assert part.status_code == 206 and part.content == data[1:11]
        assert upstream.count(f"/blobs/{digest}", "GET") == fetched_before + 1


async def test_cache_range_and_head_of_blobs_the_cluster_lacks(etcd, cluster_name, client, upstream):
    """What containerd (a Range to resume) and pushing clients (a HEAD first) ask of a blob no node
    has yet: a Range is answered from the fill with 206 and exactly those bytes; a HEAD answers the
    upstream's size and fills the blob, so the GET after it is a hit; one upstream GET each."""
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=3600)
    name = f"{hub.name}/{REPO}"
    ranged, probed = random_bytes(3 * 1024 * 1024 + 17, uuid.uuid4().hex), random_bytes(70_000, uuid.uuid4().hex)
    async with httpx.AsyncClient(base_url=upstream.url, timeout=30) as registry:
        ranged_digest = await push_blob(registry, REPO, ranged)
        probed_digest = await push_blob(registry, REPO, probed)

    part = await client.get(f"/v2/{name}/blobs/{ranged_digest}", headers={"Range": "bytes=2097152-2098175"})
    assert part.status_code == 206, part.text
    assert part.content == ranged[2097152:2098176]
    assert part.headers["content-range"] == f"bytes 2097152-2098175/{len(ranged)}"
    assert part.headers["x-cargohold-cache"] == "miss"

    head = await client.head(f"/v2/{name}/blobs/{probed_digest}")
    assert head.status_code == 200 and head.headers["x-cargohold-cache"] == "miss"
    assert int(head.headers["content-length"]) == len(probed) and head.headers["docker-content-digest"] == probed_digest

    probed_again = await eventually(lambda: _hit(client, f"/v2/{name}/blobs/{probed_digest}"),
                                    what="the probed blob filled")
    assert probed_again.content == probed
    whole = await eventually(lambda: _hit(client, f"/v2/{name}/blobs/{ranged_digest}"), what="the ranged blob filled")
    assert whole.content == ranged
    for digest in (ranged_digest, probed_digest):
        assert upstream.count(f"/blobs/{digest}", "GET") == 1


async def _hit(client, path: str):
    """The response to a GET of `path` if the cache served it as a hit, else None."""
    response = await client.get(path)
    return response if response.headers["x-cargohold-cache"] == "hit" else None
