"""Protected and immutable tags cannot be broken sideways (issue 12, items 4 and 5).

A user with `delete` but no right to change a protected tag must not make it unpullable by
deleting its image's layers, config or child manifests (item 4), nor by deleting its manifest by
digest while the tag is being pushed through another node (item 5). Real nodes, real etcd.
"""

from __future__ import annotations

import random
import secrets

import anyio
import httpx
import pytest

from cargohold.coordinator import policies
from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from tests.auth.conftest import PASSWORDS, start_secured
from tests.support.oci import build_image, build_index, describe, error_codes, push_blob, push_image, push_manifest
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

RACE_ROUNDS = 40


def _unique(prefix: str) -> str:
    return f"{prefix}/r{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def second(secured, tmp_path_factory, etcd, cluster_name):
    """Another node of the secured node's cluster."""
    node = start_secured(tmp_path_factory, etcd, cluster_name, node_id="n2", provision_accounts=False)
    node.robots = secured.robots
    try:
        yield node
    finally:
        node.node.stop()


async def _bearer(node, login: str, repo: str) -> httpx.AsyncClient:
    """A client with one token for pull, push and delete on `repo` (no challenge per request)."""
    secret = node.robots.get(login) or PASSWORDS[login]
    async with httpx.AsyncClient(base_url=node.url, auth=(login, secret)) as c:
        r = await c.get("/token", params={"service": node.service, "scope": f"repository:{repo}:pull,push,delete"})
        assert r.status_code == 200, describe(r)
    return httpx.AsyncClient(base_url=node.url, headers={"Authorization": f"Bearer {r.json()['token']}"},
                             timeout=30.0)


async def _assert_pulls_byte_exact(client: httpx.AsyncClient, repo: str, tag: str, image) -> None:
    r = await client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": image.media_type})
    assert r.status_code == 200 and r.content == image.manifest, describe(r)
    for child in image.children:
        await _assert_pulls_byte_exact(client, repo, child.digest, child)
    for blob_digest, data in image.blobs.items():
        r = await client.get(f"/v2/{repo}/blobs/{blob_digest}")
        assert r.status_code == 200 and r.content == data, describe(r)


def _assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 409 and error_codes(response) == ["DENIED"], describe(response)
    assert "delete that manifest first" in response.json()["errors"][0]["message"]


async def _try_to_break_sideways(attacker: httpx.AsyncClient, repo: str, image, index) -> None:
    """Every blob of `image` and every child of `index` is refused; nothing changes."""
    for blob_digest in image.blobs:
        _assert_refused(await attacker.delete(f"/v2/{repo}/blobs/{blob_digest}"))
    for child in index.children:
        _assert_refused(await attacker.delete(f"/v2/{repo}/manifests/{child.digest}"))
        for blob_digest in child.blobs:
            _assert_refused(await attacker.delete(f"/v2/{repo}/blobs/{blob_digest}"))


async def test_a_protected_tags_image_cannot_be_broken_sideways(secured):
    repo = _unique("team")
    image, index = build_image("sideways-image"), build_index("sideways-index")
    async with secured.client("robot$ci") as ci, secured.client("alice") as alice:
        await push_image(ci, repo, "v1", image)
        await push_image(ci, repo, "v2", index)
        await _try_to_break_sideways(alice, repo, image, index)
        await _assert_pulls_byte_exact(alice, repo, "v1", image)
        await _assert_pulls_byte_exact(alice, repo, "v2", index)


async def test_an_immutable_tags_image_cannot_be_broken_sideways(secured):
    repo = _unique("public")          # alice may push and delete here, and no tag is protected
    async with EtcdClient([secured.etcd_url]) as client:
        await ClusterMetadata(client, secured.cluster, "tests").set_policies(
            policies.parse({"immutable": [{"repositories": "public/**", "tags": "v*"}]}))
    image, index = build_image("immutable-image"), build_index("immutable-index")
    async with secured.client("alice") as alice:
        await push_image(alice, repo, "v1", image)
        await push_image(alice, repo, "v2", index)

        async def tag_delete_refused():
            return (await alice.delete(f"/v2/{repo}/manifests/v1")).status_code == 403
        await eventually(tag_delete_refused, what="the node applies the immutable rule")
        await _try_to_break_sideways(alice, repo, image, index)
        await _assert_pulls_byte_exact(alice, repo, "v1", image)
        await _assert_pulls_byte_exact(alice, repo, "v2", index)


async def test_an_unreferenced_blob_is_still_deleted(secured):
    repo = _unique("team")
    image = build_image("deletable")
    async with secured.client("alice") as alice:
        await push_image(alice, repo, "latest", image)
        loose = await push_blob(alice, repo, b"referenced by no manifest")
        r = await alice.delete(f"/v2/{repo}/blobs/{loose}")
        assert r.status_code == 202, describe(r)
        assert (await alice.get(f"/v2/{repo}/blobs/{loose}")).status_code == 404
        # Once its manifest is gone, a layer is an ordinary unreferenced blob (the spec's conformance order).
        assert (await alice.delete(f"/v2/{repo}/manifests/{image.digest}")).status_code == 202
        for blob_digest in image.blobs:
            r = await alice.delete(f"/v2/{repo}/blobs/{blob_digest}")
            assert r.status_code == 202, describe(r)


async def test_a_delete_by_digest_never_takes_a_protected_tag_pushed_through_another_node(secured, second):
    """Item 5: push `v1` through B while the deleter (who may not touch `v*`) deletes by digest
    through A. Whatever the interleaving, v1 survives and pulls: tag present => manifest present."""
    repo = _unique("team")
    base = build_image("race")
    ci = await _bearer(second, "robot$ci", repo)
    alice = await _bearer(secured, "alice", repo)
    outcomes: dict[int, int] = {}
    async with ci, alice:
        for data in base.blobs.values():
            await push_blob(alice, repo, data)
        for round_ in range(RACE_ROUNDS):
            image = build_image("race", annotations={"round": str(round_)})   # same blobs, a new manifest
            r = await push_manifest(alice, repo, image.digest, image.manifest, image.media_type)
            assert r.status_code == 201, describe(r)
            answers = {}

            async def tag_through_b():
                answers["push"] = await push_manifest(ci, repo, "v1", image.manifest, image.media_type)

            async def delete_through_a(delay: float):
                await anyio.sleep(delay)
                answers["delete"] = await alice.delete(f"/v2/{repo}/manifests/{image.digest}")

            async with anyio.create_task_group() as tg:
                tg.start_soon(tag_through_b)
                tg.start_soon(delete_through_a, random.uniform(0, 0.03))
            assert answers["push"].status_code == 201, describe(answers["push"])
            status = answers["delete"].status_code
            assert status in (202, 403), describe(answers["delete"])
            outcomes[status] = outcomes.get(status, 0) + 1
            # Through B, which acknowledged the push and so reads it; A's read model follows.
            r = await ci.get(f"/v2/{repo}/manifests/v1", headers={"Accept": image.media_type})
            assert r.status_code == 200 and r.content == image.manifest, \
                f"round {round_}: delete answered {status}, then v1: {describe(r)}"

            async def a_pulls_v1():
                r = await alice.get(f"/v2/{repo}/manifests/v1", headers={"Accept": image.media_type})
                return r.status_code == 200 and r.content == image.manifest
            await eventually(a_pulls_v1, what=f"round {round_}: node A serves this round's v1")
    print(f"delete outcomes over {RACE_ROUNDS} rounds: {outcomes}")
