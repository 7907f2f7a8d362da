"""A virtual repository on one node, through real requests: pushes land in the deployment
target, reads resolve in member order (a local image shadows the remote one), members' globs
keep names away from the upstream, a member whose upstream is down does not stop the others,
nested virtual repositories, tag lists, referrers and the catalog merged."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from tests.pullthrough.conftest import REPO, client_of, push, remote, running_upstream, unique
from tests.pullthrough.conftest import node, upstream    # noqa: F401  (fixtures)
from tests.support.oci import build_artifact, build_image, describe, digest, error_codes, random_bytes
from tests.support.poll import eventually
from tests.virtual.nodekit import MEMBER, define_virtual, get_ok, manifest, virtual

pytestmark = pytest.mark.anyio

BOUND = 10.0    # seconds: far below the upstream client's read timeout (30 s)


@pytest.fixture
async def client(node):     # noqa: F811
    async with client_of(node) as c:
        yield c


async def test_node_push_through_virtual_then_pull_through_it_and_the_target(etcd, cluster_name, client, node):
    team, dev = unique("team"), unique("dev")
    await virtual(etcd, cluster_name, [client], dev, [team], deploy_to=team)
    image = build_image("pushed-through")
    config, layer, second_layer = list(image.blobs.items())
    # monolithic upload
    created = await client.post(f"/v2/{dev}/app/blobs/uploads/", params={"digest": config[0]}, content=config[1])
    assert created.status_code == 201, describe(created)
    assert created.headers["location"] == f"/v2/{dev}/app/blobs/{config[0]}"
    # chunked upload, continued at the Location it answered (under the virtual name)
    for blob_digest, data in (layer, second_layer):
        started = await client.post(f"/v2/{dev}/app/blobs/uploads/")
        assert started.status_code == 202, describe(started)
        assert started.headers["location"].startswith(f"/v2/{dev}/app/blobs/uploads/")
        half = len(data) // 2
        patched = await client.patch(started.headers["location"], content=data[:half],
                                     headers={"Content-Range": f"0-{half - 1}"})
        assert patched.status_code == 202, describe(patched)
        assert patched.headers["location"].startswith(f"/v2/{dev}/app/")
        done = await client.put(patched.headers["location"], params={"digest": blob_digest}, content=data[half:],
                                headers={"Content-Range": f"{half}-{len(data) - 1}"})
        assert done.status_code == 201, describe(done)
    put = await client.put(f"/v2/{dev}/app/manifests/1.0", content=image.manifest,
                           headers={"Content-Type": image.media_type})
    assert put.status_code == 201, describe(put)
    assert put.headers["location"] == f"/v2/{dev}/app/manifests/{image.digest}"

    for name in (f"{dev}/app", f"{team}/app"):
        pulled = await manifest(client, name, "1.0")
        assert pulled.status_code == 200 and pulled.content == image.manifest, describe(pulled)
        for blob_digest, data in image.blobs.items():
            assert (await get_ok(client, f"/v2/{name}/blobs/{blob_digest}")).content == data
    assert (await manifest(client, f"{dev}/app", "1.0")).headers[MEMBER] == f"{team}/app"
    # a delete through the virtual name is refused; through the target it works
    refused = await client.delete(f"/v2/{dev}/app/manifests/{image.digest}")
    assert refused.status_code == 403 and error_codes(refused) == ["DENIED"], describe(refused)
    assert f"{team}/app" in refused.text


async def test_node_push_without_target_denied(etcd, cluster_name, client):
    team, dev = unique("team"), unique("dev")
    await virtual(etcd, cluster_name, [client], dev, [team])
    refused = await client.post(f"/v2/{dev}/app/blobs/uploads/")
    assert refused.status_code == 403 and error_codes(refused) == ["DENIED"]
    assert f"{dev} is a virtual repository without a deployment target" in refused.text


async def test_node_remote_only_then_local_shadows_then_delete(etcd, cluster_name, client, upstream):   # noqa: F811
    hub = await remote(etcd, cluster_name, client, upstream.url)
    team, dev = unique("team"), unique("dev")
    await virtual(etcd, cluster_name, [client], dev, [team, hub.name], deploy_to=team)
    name = f"{dev}/{REPO}"

    from_cache = await manifest(client, name, "v1")
    assert from_cache.status_code == 200 and from_cache.content == upstream.image.manifest, describe(from_cache)
    assert from_cache.headers[MEMBER] == f"{hub.name}/{REPO}"
    assert from_cache.headers["x-cargohold-cache"] == "miss"
    for blob_digest, data in upstream.image.blobs.items():
        blob = await get_ok(client, f"/v2/{name}/blobs/{blob_digest}")
        assert blob.content == data and blob.headers[MEMBER] == f"{hub.name}/{REPO}"

    local = build_image("patched")
    await push(client.base_url, name, "v1", local)      # through the virtual name: lands in team/...
    shadowing = await manifest(client, name, "v1")
    assert shadowing.content == local.manifest and shadowing.headers[MEMBER] == f"{team}/{REPO}"

    deleted = await client.delete(f"/v2/{team}/{REPO}/manifests/{local.digest}")
    assert deleted.status_code == 202, describe(deleted)
    again = await manifest(client, name, "v1")
    assert again.content == upstream.image.manifest and again.headers[MEMBER] == f"{hub.name}/{REPO}"


async def test_node_member_globs_keep_names_from_the_upstream(etcd, cluster_name, client, upstream):  # noqa: F811
    hub = await remote(etcd, cluster_name, client, upstream.url)
    team, dev, only = unique("team"), unique("dev"), unique("only")
    await virtual(etcd, cluster_name, [client], dev, [team, hub.name], exclude={hub.name: ("team/**",)})
    await virtual(etcd, cluster_name, [client], only, [hub.name], include={hub.name: ("team/*",)})
    before = upstream.count(f"/v2/{REPO}/")

    excluded = await manifest(client, f"{dev}/{REPO}", "v1")
    assert excluded.status_code == 404 and error_codes(excluded) == ["MANIFEST_UNKNOWN"], describe(excluded)
    assert (await client.get(f"/v2/{dev}/{REPO}/blobs/{next(iter(upstream.image.blobs))}")).status_code == 404
    assert (await client.get(f"/v2/{dev}/{REPO}/tags/list")).status_code == 404
    assert upstream.count(f"/v2/{REPO}/") == before, "an excluded name was asked of the upstream"

    included = await manifest(client, f"{only}/{REPO}", "v1")
    assert included.status_code == 200 and included.content == upstream.image.manifest


@pytest.fixture(scope="module")
def doomed(tmp_path_factory):
    with running_upstream(tmp_path_factory.mktemp("doomed-upstream")) as registry:
        yield registry


async def test_node_upstream_down_next_member_and_cached_content(etcd, cluster_name, client, doomed):
    down = await remote(etcd, cluster_name, client, doomed.url, ttl=1)
    team, dev = unique("team"), unique("dev")
    await virtual(etcd, cluster_name, [client], dev, [down.name, team], deploy_to=team)
    cached = await manifest(client, f"{dev}/{REPO}", "v1")          # cached while the upstream is up
    assert cached.status_code == 200 and cached.headers[MEMBER] == f"{down.name}/{REPO}"
    local = build_image("only-local")
    await push(client.base_url, f"{team}/other", "1", local)
    doomed.process.kill()
    await anyio.sleep(1.2)          # the cached tag's check is older than its ttl: the upstream is asked

    started = time.monotonic()
    stale = await manifest(client, f"{dev}/{REPO}", "v1")
    assert stale.status_code == 200 and stale.content == doomed.image.manifest, describe(stale)
    assert stale.headers["x-cargohold-cache"] == "stale"
    next_member = await manifest(client, f"{dev}/other", "1")
    assert next_member.status_code == 200 and next_member.content == local.manifest, describe(next_member)
    assert next_member.headers[MEMBER] == f"{team}/other"
    nowhere = await manifest(client, f"{dev}/nowhere", "1")
    assert nowhere.status_code == 503 and error_codes(nowhere) == ["UNAVAILABLE"], describe(nowhere)
    assert time.monotonic() - started < BOUND


async def test_node_changed_members_followed_without_restart(etcd, cluster_name, client):
    first, second, dev = unique("ta"), unique("tb"), unique("dev")
    await virtual(etcd, cluster_name, [client], dev, [first])
    await push(client.base_url, f"{first}/app", "1", build_image("first"))
    await push(client.base_url, f"{second}/app", "1", build_image("second"))
    assert (await manifest(client, f"{dev}/app", "1")).headers[MEMBER] == f"{first}/app"
    await define_virtual(etcd, cluster_name, dev, [second, first], replace=True)

    async def reordered() -> bool:
        return (await manifest(client, f"{dev}/app", "1")).headers.get(MEMBER) == f"{second}/app"
    await eventually(reordered, what="the new member order followed")


async def test_node_nested_virtual(etcd, cluster_name, client):
    team_a, team_b, inner, outer = unique("ta"), unique("tb"), unique("inner"), unique("outer")
    await virtual(etcd, cluster_name, [client], inner, [team_b], deploy_to=team_b)
    await virtual(etcd, cluster_name, [client], outer, [team_a, inner], deploy_to=inner)
    image, first = build_image("nested"), build_image("nested-first")
    await push(client.base_url, f"{outer}/app", "1", image)       # lands in team_b: outer -> inner -> team_b
    assert (await manifest(client, f"{team_b}/app", "1")).content == image.manifest
    through = await manifest(client, f"{outer}/app", "1")
    assert through.content == image.manifest and through.headers[MEMBER] == f"{team_b}/app"
    await push(client.base_url, f"{team_a}/app", "1", first)       # the outer's first member wins
    assert (await manifest(client, f"{outer}/app", "1")).headers[MEMBER] == f"{team_a}/app"
    assert (await manifest(client, f"{inner}/app", "1")).content == image.manifest


async def test_node_tags_referrers_catalog_and_mount_across_members(etcd, cluster_name, client, upstream):  # noqa: F811
    hub = await remote(etcd, cluster_name, client, upstream.url)
    team, dev = unique("team"), unique("dev")
    await virtual(etcd, cluster_name, [client], dev, [team, hub.name], deploy_to=team)
    name = f"{dev}/{REPO}"
    assert (await manifest(client, name, "v1")).status_code == 200          # cached from the upstream
    await push(client.base_url, f"{team}/{REPO}", "local-1", build_image("tagged-locally"))
    await push(client.base_url, f"{team}/{REPO}", "v1", build_image("shadow"))

    tags = (await get_ok(client, f"/v2/{name}/tags/list")).json()
    assert tags == {"name": name, "tags": ["local-1", "multi", "v1"]}
    first = await get_ok(client, f"/v2/{name}/tags/list", params={"n": 1})
    assert first.json()["tags"] == ["local-1"] and "last=local-1" in first.headers["link"]

    # a signature attached in the local namespace shows up for the image served from the remote member
    signature = build_artifact("signature", subject=upstream.image)
    await push(client.base_url, f"{team}/{REPO}", None, signature)
    referrers = (await get_ok(client, f"/v2/{name}/referrers/{upstream.image.digest}")).json()
    assert [m["digest"] for m in referrers["manifests"]] == [signature.digest]

    catalog = (await get_ok(client, "/v2/_catalog")).json()["repositories"]
    assert name in catalog and f"{team}/{REPO}" in catalog

    # a cross-repository mount from the virtual name takes the blob from the member holding it
    blob_digest = next(iter(upstream.image.blobs))
    await get_ok(client, f"/v2/{name}/blobs/{blob_digest}")        # now in the remote member's cache
    mounted = await client.post(f"/v2/{team}/mounted/blobs/uploads/", params={"mount": blob_digest, "from": name})
    assert mounted.status_code == 201, describe(mounted)
    data = random_bytes(64, "not-mountable")
    plain = await client.post(f"/v2/{team}/mounted/blobs/uploads/", params={"mount": digest(data), "from": name})
    assert plain.status_code == 202, describe(plain)


def _etcd_ranges(etcd) -> float:
    """etcd's count of range requests so far (its Prometheus metrics)."""
    text = httpx.get(f"{etcd.url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('etcd_debugging_mvcc_range_total') or
               line.startswith('etcd_mvcc_range_total'))


async def test_node_candidates_that_miss_cost_no_etcd_round_trip(etcd, cluster_name, client):
    first, second, third, dev = unique("ta"), unique("tb"), unique("tc"), unique("dev")
    await virtual(etcd, cluster_name, [client], dev, [first, second, third])
    image = build_image("in-the-third")
    await push(client.base_url, f"{third}/app", "1", image)
    await push(client.base_url, f"{first}/other", "1", build_image("elsewhere"))   # the members exist
    await push(client.base_url, f"{second}/other", "1", build_image("elsewhere"))
    rounds = 20

    async def ranges_of(name: str) -> float:
        before = _etcd_ranges(etcd)
        for _ in range(rounds):
            assert (await manifest(client, name, "1")).content == image.manifest
        return _etcd_ranges(etcd) - before

    direct, through = await ranges_of(f"{third}/app"), await ranges_of(f"{dev}/app")
    assert direct >= rounds / 2, "etcd's range metric does not count the read barriers"
    assert through <= direct + 3, f"{through} etcd range requests through the virtual name, {direct} direct"
