"""Blobs of a remote repository through a node: a miss streams from engine-blobs' fill, after
which the blob is an ordinary blob of the cluster, served without asking the upstream."""

from __future__ import annotations

import pytest

from tests.pullthrough.conftest import REPO, remote
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

        async def published():     # until then, another GET joins the fill (a miss too)
            response = await client.get(f"/v2/{name}/blobs/{digest}")
            return response if response.headers["x-cargohold-cache"] == "hit" else None
        again = await eventually(published, what="the filled blob published in the cluster")
        assert again.content == data
        part = await client.get(f"/v2/{name}/blobs/{digest}", headers={"Range": "bytes=1-10"})
        assert part.status_code == 206 and part.content == data[1:11]
        assert upstream.count(f"/blobs/{digest}", "GET") == fetched_before + 1
