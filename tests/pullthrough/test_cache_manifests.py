"""Manifests, tags and tag lists through a remote repository, against a real Distribution
upstream, counting what the upstream was asked from its own access log."""

from __future__ import annotations

import anyio
import pytest

from cargohold.repositories.definitions import RemoteRepository
from tests.pullthrough.conftest import REPO, define, push, remote, remove, unique, wait_routed
from tests.support.oci import OCI_INDEX, build_image, error_codes
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

MANIFESTS = f"/v2/{REPO}/manifests/"


async def test_cache_tag_fresh_within_ttl(etcd, cluster_name, client, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=3600)
    first = await client.get(f"/v2/{hub.name}/{REPO}/manifests/v1")
    assert first.status_code == 200, first.text
    assert first.content == upstream.image.manifest
    assert first.headers["docker-content-digest"] == upstream.image.digest
    assert first.headers["x-cargohold-cache"] == "miss"
    before = upstream.count(MANIFESTS)
    for _ in range(5):
        again = await client.get(f"/v2/{hub.name}/{REPO}/manifests/v1")
        assert again.status_code == 200 and again.content == upstream.image.manifest
        assert again.headers["x-cargohold-cache"] == "hit"
    head = await client.head(f"/v2/{hub.name}/{REPO}/manifests/v1")
    assert head.status_code == 200 and head.headers["x-cargohold-cache"] == "hit"
    assert upstream.count(MANIFESTS) == before       # not one upstream request within the ttl


async def test_cache_revalidates_with_head_after_ttl(etcd, cluster_name, client, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=1)
    assert (await client.get(f"/v2/{hub.name}/{REPO}/manifests/v1")).status_code == 200
    heads, gets = upstream.count(MANIFESTS, "HEAD"), upstream.count(MANIFESTS, "GET")
    await anyio.sleep(1.2)
    again = await client.get(f"/v2/{hub.name}/{REPO}/manifests/v1")
    assert again.status_code == 200 and again.content == upstream.image.manifest
    assert again.headers["x-cargohold-cache"] == "revalidated"
    assert upstream.count(MANIFESTS, "HEAD") == heads + 1
    assert upstream.count(MANIFESTS, "GET") == gets
    fresh = await client.get(f"/v2/{hub.name}/{REPO}/manifests/v1")
    assert fresh.headers["x-cargohold-cache"] == "hit"     # the check counts for another ttl


async def test_cache_tag_moved_upstream(etcd, cluster_name, client, upstream):
    tag = unique("moving-")
    old, new = build_image(f"{tag}-old"), build_image(f"{tag}-new")
    await push(upstream.url, REPO, tag, old)
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=1)
    first = await client.get(f"/v2/{hub.name}/{REPO}/manifests/{tag}")
    assert first.headers["docker-content-digest"] == old.digest
    await push(upstream.url, REPO, tag, new)
    await anyio.sleep(1.2)
    moved = await client.get(f"/v2/{hub.name}/{REPO}/manifests/{tag}")
    assert moved.status_code == 200, moved.text
    assert moved.content == new.manifest and moved.headers["docker-content-digest"] == new.digest
    assert moved.headers["x-cargohold-cache"] == "miss"
    kept = await client.get(f"/v2/{hub.name}/{REPO}/manifests/{old.digest}")
    assert kept.status_code == 200 and kept.content == old.manifest
    assert kept.headers["x-cargohold-cache"] == "hit"


async def test_cache_by_digest_never_revalidated(etcd, cluster_name, client, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=0.5)
    path = f"/v2/{hub.name}/{REPO}/manifests/{upstream.image.digest}"
    first = await client.get(path)
    assert first.status_code == 200 and first.headers["x-cargohold-cache"] == "miss"
    before = upstream.count(MANIFESTS)
    await anyio.sleep(0.7)
    for _ in range(3):
        again = await client.get(path)
        assert again.status_code == 200 and again.headers["x-cargohold-cache"] == "hit"
    assert upstream.count(MANIFESTS) == before


async def test_cache_multi_arch_index_children_on_demand(etcd, cluster_name, client, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=3600)
    index = await client.get(f"/v2/{hub.name}/{REPO}/manifests/multi", headers={"Accept": OCI_INDEX})
    assert index.status_code == 200, index.text
    assert index.content == upstream.index.manifest
    child = upstream.index.children[0]
    fetched_before = upstream.count(f"manifests/{child.digest}", "GET")
    first = await client.get(f"/v2/{hub.name}/{REPO}/manifests/{child.digest}")
    assert first.status_code == 200 and first.content == child.manifest
    assert first.headers["x-cargohold-cache"] == "miss"
    assert upstream.count(f"manifests/{child.digest}", "GET") == fetched_before + 1
    other = upstream.index.children[1]
    assert upstream.count(f"manifests/{other.digest}", "GET") == 0     # never asked for: never fetched
    second = await client.get(f"/v2/{hub.name}/{REPO}/manifests/{child.digest}")
    assert second.headers["x-cargohold-cache"] == "hit"


async def test_cache_writes_refused_denied(etcd, cluster_name, client, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=3600)
    name = f"{hub.name}/{REPO}"
    cached = await client.get(f"/v2/{name}/manifests/v1")
    other = build_image("pushed-into-cache")
    attempts = [
        await client.put(f"/v2/{name}/manifests/v1", content=other.manifest,
                         headers={"Content-Type": other.media_type}),
        await client.post(f"/v2/{name}/blobs/uploads/"),
        await client.delete(f"/v2/{name}/manifests/{upstream.image.digest}"),
        await client.delete(f"/v2/{name}/blobs/{upstream.image.digest}"),
    ]
    for response in attempts:
        assert response.status_code == 403, response.text
        assert error_codes(response) == ["DENIED"]
        assert "read-only cache" in response.json()["errors"][0]["message"]
    after = await client.get(f"/v2/{name}/manifests/v1")
    assert after.content == cached.content == upstream.image.manifest


async def test_cache_excluded_name_never_asked_upstream(etcd, cluster_name, client, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, include=("team/**",), exclude=("team/secret*",))
    for path in (f"/v2/{hub.name}/team/secret-thing/manifests/v1", f"/v2/{hub.name}/other/app/manifests/v1",
                 f"/v2/{hub.name}/team/secret-thing/tags/list"):
        response = await client.get(path)
        assert response.status_code == 404, response.text
        assert error_codes(response) == ["NAME_UNKNOWN"]
    assert upstream.count("secret-thing") == 0 and upstream.count("other/app") == 0


async def test_cache_mirror_request_with_ns(etcd, cluster_name, client, upstream):
    # every test here defines a remote repository of the same upstream: this one answers for
    # a registry name of its own (`--mirror-for`), as containerd sends it in `?ns=`
    host = f"{unique('mirror-')}.example"
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=3600, mirror_for=(host,))
    mirrored = await client.get(f"/v2/{REPO}/manifests/v1", params={"ns": host})
    assert mirrored.status_code == 200, mirrored.text
    assert mirrored.content == upstream.image.manifest
    # stored under the canonical name: the namespace form finds it cached
    named = await client.get(f"/v2/{hub.name}/{REPO}/manifests/v1")
    assert named.headers["x-cargohold-cache"] == "hit"
    first_page = await client.get(f"/v2/{REPO}/tags/list", params={"ns": host, "n": 1})
    assert first_page.json()["name"] == REPO
    assert first_page.headers["link"].endswith(f'&ns={host}>; rel="next"')


async def test_cache_tags_list_from_upstream(etcd, cluster_name, client, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=3600)
    listed = await client.get(f"/v2/{hub.name}/{REPO}/tags/list")
    assert listed.status_code == 200, listed.text
    tags = listed.json()["tags"]
    assert listed.json()["name"] == f"{hub.name}/{REPO}"
    assert {"multi", "v1"} <= set(tags) and tags == sorted(tags)    # the upstream's: nothing pulled yet
    first_page = await client.get(f"/v2/{hub.name}/{REPO}/tags/list", params={"n": 1})
    assert first_page.json()["tags"] == tags[:1] and 'rel="next"' in first_page.headers["link"]
    before = upstream.count(f"/v2/{REPO}/tags/list")
    await client.get(f"/v2/{hub.name}/{REPO}/tags/list")
    assert upstream.count(f"/v2/{REPO}/tags/list") == before       # kept for the ttl on this node


async def test_cache_catalog_lists_cached_images(etcd, cluster_name, client, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=3600)
    assert (await client.get(f"/v2/{hub.name}/{REPO}/manifests/v1")).status_code == 200
    catalog = await client.get("/v2/_catalog")
    assert f"{hub.name}/{REPO}" in catalog.json()["repositories"]


async def test_cache_definition_changes_followed_without_restart(etcd, cluster_name, client, upstream, node):
    name = unique()
    wrong = RemoteRepository(name=name, url="http://127.0.0.1:9")      # nothing listens there
    await define(etcd, cluster_name, wrong)
    await wait_routed(client, name)
    refused = await client.get(f"/v2/{name}/{REPO}/manifests/v1")
    assert refused.status_code == 503 and error_codes(refused) == ["UNAVAILABLE"]
    assert "retry-after" in refused.headers
    await define(etcd, cluster_name, wrong.with_changes(url=upstream.url), replace=True)

    async def served() -> bool:
        response = await client.get(f"/v2/{name}/{REPO}/manifests/v1")
        return response.status_code == 200 and response.content == upstream.image.manifest
    await eventually(served, what="the changed definition followed")
    await remove(etcd, cluster_name, name)

    async def local_again() -> bool:
        return (await client.post(f"/v2/{name}/x/blobs/uploads/")).status_code == 202
    await eventually(local_again, what="the removed definition no longer routes")
    assert node.alive()
