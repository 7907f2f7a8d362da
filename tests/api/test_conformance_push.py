"""Push behaviours the OCI conformance program checks beyond the classic workflows.

* A mount without `from` (the spec's "automatic content discovery", the program's "anonymous
  mount", on by default for spec 1.1): when the blob is in a repository the caller may pull,
  the registry mounts it (201 + Location + Docker-Content-Digest); otherwise it is an ordinary
  upload session (202), which reveals nothing.
* A manifest PUT by digest with `tag` query parameters (distribution-spec main: pushing
  several tags at once, and the only way to tag a manifest whose digest is not sha256): every
  tag points at the manifest afterwards, each is confirmed by its own `OCI-Tag` header, and a
  tag the caller may not touch refuses the whole push.
"""

from __future__ import annotations

import httpx
import pytest

from cargohold.coordinator import policies
from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from tests.auth.conftest import start_secured
from tests.support.oci import (
    build_image, describe, digest, error_codes, push_blob, random_bytes, with_query,
)
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

OCTET = {"Content-Type": "application/octet-stream"}


async def push_blobs(client: httpx.AsyncClient, repo: str, image) -> None:
    for data in image.blobs.values():
        await push_blob(client, repo, data)


async def put_by_digest(client: httpx.AsyncClient, repo: str, body: bytes, media_type: str,
                        tags: list[str], algorithm: str = "sha256") -> httpx.Response:
    return await client.put(f"/v2/{repo}/manifests/{digest(body, algorithm)}", params=[("tag", t) for t in tags],
                            content=body, headers={"Content-Type": media_type})


# -- mount without `from` ----------------------------------------------------------------------
async def test_mount_without_from_takes_the_blob_from_the_repository_that_has_it(client, repo):
    data = random_bytes(3_000, "discovered-mount")
    d = await push_blob(client, repo, data)
    target = repo + "-elsewhere"
    r = await client.post(f"/v2/{target}/blobs/uploads/", params={"mount": d}, headers={"Content-Length": "0"})
    assert r.status_code == 201, describe(r)
    assert r.headers.get("Docker-Content-Digest") == d, describe(r)
    fetched = await client.get(r.headers["Location"])
    assert fetched.status_code == 200 and fetched.content == data, describe(fetched)


async def test_mount_without_from_of_an_unknown_or_malformed_digest_is_an_upload(client, repo):
    data = random_bytes(700, "nowhere")
    for mount in (digest(data), "sha256:not-a-digest"):
        r = await client.post(f"/v2/{repo}/blobs/uploads/", params={"mount": mount}, headers={"Content-Length": "0"})
        assert r.status_code == 202, describe(r)
    done = await client.put(with_query(r.headers["Location"], digest=digest(data)), content=data, headers=OCTET)
    assert done.status_code == 201, describe(done)


# -- tag parameters on a push by digest --------------------------------------------------------
async def test_push_by_digest_with_tag_parameters_sets_every_tag(client, repo):
    image = build_image("tag-params")
    await push_blobs(client, repo, image)
    r = await put_by_digest(client, repo, image.manifest, image.media_type, ["one", "two", "one"])
    assert r.status_code == 201, describe(r)
    assert r.headers.get_list("OCI-Tag") == ["one", "two"], describe(r)
    for tag in ("one", "two"):
        head = await client.head(f"/v2/{repo}/manifests/{tag}")
        assert head.headers.get("Docker-Content-Digest") == image.digest, describe(head)
    listed = await client.get(f"/v2/{repo}/tags/list")
    assert listed.json()["tags"] == ["one", "two"], describe(listed)


async def test_push_by_digest_without_tag_parameters_confirms_no_tag(client, repo):
    image = build_image("no-tag-params")
    await push_blobs(client, repo, image)
    r = await put_by_digest(client, repo, image.manifest, image.media_type, [])
    assert r.status_code == 201, describe(r)
    assert "OCI-Tag" not in r.headers, describe(r)


async def test_tag_parameter_tags_a_sha512_manifest(client, repo):
    image = build_image("sha512-tag")
    await push_blobs(client, repo, image)
    r = await put_by_digest(client, repo, image.manifest, image.media_type, ["latest"], algorithm="sha512")
    assert r.status_code == 201, describe(r)
    assert r.headers.get_list("OCI-Tag") == ["latest"], describe(r)
    pulled = await client.get(f"/v2/{repo}/manifests/latest", headers={"Accept": image.media_type})
    assert pulled.content == image.manifest, describe(pulled)
    assert pulled.headers.get("Docker-Content-Digest") == digest(image.manifest, "sha512"), describe(pulled)


async def test_malformed_tag_parameter_refuses_the_push(client, repo):
    image = build_image("bad-tag-param")
    await push_blobs(client, repo, image)
    r = await put_by_digest(client, repo, image.manifest, image.media_type, ["fine", "-no/good"])
    assert r.status_code == 400, describe(r)
    assert error_codes(r) == ["MANIFEST_INVALID"], describe(r)
    assert (await client.head(f"/v2/{repo}/manifests/{image.digest}")).status_code == 404
    assert (await client.head(f"/v2/{repo}/manifests/fine")).status_code == 404


# -- with access control: the same rules as every other push and mount --------------------------
@pytest.fixture(scope="module")
def secured_node(tmp_path_factory, etcd, cluster_name):
    """A node with access control on and tests/auth's accounts and rules: alice (group devs)
    pushes to team/**, tags v* and stable there are protected (only robot:ci touches them), bob
    pushes only to bob/*."""
    secured = start_secured(tmp_path_factory, etcd, f"{cluster_name}-secured")
    try:
        yield secured
    finally:
        secured.node.stop()


async def test_tag_parameters_cannot_touch_a_protected_tag(secured_node):
    image = build_image("protected-tag-param")
    async with secured_node.client("alice", basic=True) as alice:
        await push_blobs(alice, "team/app", image)
        r = await put_by_digest(alice, "team/app", image.manifest, image.media_type, ["dev", "v1"])
        assert r.status_code == 403, describe(r)
        assert error_codes(r) == ["DENIED"], describe(r)
        assert (await alice.head("/v2/team/app/manifests/dev")).status_code == 404
        assert (await alice.head("/v2/team/app/manifests/v1")).status_code == 404
        r = await put_by_digest(alice, "team/app", image.manifest, image.media_type, ["dev"])
        assert r.status_code == 201 and r.headers.get_list("OCI-Tag") == ["dev"], describe(r)


async def test_tag_parameters_cannot_move_an_immutable_tag(secured_node):
    async with EtcdClient([secured_node.etcd_url]) as etcd_client:
        await ClusterMetadata(etcd_client, secured_node.cluster, "tests").set_policies(
            policies.parse({"immutable": [{"repositories": "public/frozen", "tags": "v*"}]}))
    first, second = build_image("immutable-first"), build_image("immutable-second")
    async with secured_node.client("alice", basic=True) as alice:
        for image in (first, second):
            await push_blobs(alice, "public/frozen", image)
        r = await put_by_digest(alice, "public/frozen", first.manifest, first.media_type, ["v1"])
        assert r.status_code == 201, describe(r)

        async def rule_applies():
            return (await alice.delete("/v2/public/frozen/manifests/v1")).status_code == 403
        await eventually(rule_applies, what="the node applies the immutable rule")
        r = await put_by_digest(alice, "public/frozen", second.manifest, second.media_type, ["dev", "v1"])
        assert r.status_code == 403 and error_codes(r) == ["DENIED"], describe(r)
        assert (await alice.head("/v2/public/frozen/manifests/dev")).status_code == 404
        v1 = await alice.head("/v2/public/frozen/manifests/v1")
        assert v1.headers.get("Docker-Content-Digest") == first.digest, describe(v1)
        again = await put_by_digest(alice, "public/frozen", first.manifest, first.media_type, ["v1", "v1.0"])
        assert again.status_code == 201 and again.headers.get_list("OCI-Tag") == ["v1", "v1.0"], describe(again)


async def test_mount_without_from_only_takes_what_the_caller_may_pull(secured_node):
    data = random_bytes(1_800, "discovered-secured")
    async with secured_node.client("alice", basic=True) as alice:
        d = await push_blob(alice, "team/source", data)
        mounted = await alice.post("/v2/team/copy/blobs/uploads/", params={"mount": d})
        assert mounted.status_code == 201, describe(mounted)
    async with secured_node.client("bob", basic=True) as bob:
        r = await bob.post("/v2/bob/copy/blobs/uploads/", params={"mount": d})
        assert r.status_code == 202, describe(r)
        assert (await bob.head(f"/v2/bob/copy/blobs/{d}")).status_code == 404
