"""Access through a virtual name: pull needs `pull` on the virtual name (the client's token)
and on the member serving it (the rules: a member the caller may not pull is skipped, and the
denial audited with `member`); a push needs `push` on the deployment target too."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.auth.conftest import PASSWORDS, TokenAuth, provision
from tests.pullthrough.conftest import push, running_node
from tests.support.oci import build_image, describe, error_codes
from tests.virtual.nodekit import MEMBER, manifest, virtual

pytestmark = pytest.mark.anyio

RULES = {"rules": [
    {"subjects": ["user:alice"], "repositories": ["vdev/**", "vteam/**"], "actions": ["pull", "push"]},
    {"subjects": ["user:bob"], "repositories": ["vdev/**"], "actions": ["pull", "push"]},
    {"subjects": ["user:bob"], "repositories": ["vteam/**", "vsecret/**"], "actions": ["pull"]},
    {"subjects": ["user:reader"], "repositories": ["vteam/**", "vsecret/**"], "actions": ["pull"]},
]}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, etcd, cluster_name):
    provision(etcd.url, cluster_name, robots=(), rules=RULES)
    with running_node(tmp_path_factory.mktemp("guarded"), etcd, cluster_name, "--auth", "on") as node:
        yield node


def login(node, user: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=node.url, auth=TokenAuth(user, PASSWORDS[user]), timeout=30)


def denials(node) -> list[dict]:
    lines = (node.data_dir / "audit.log").read_text().splitlines()
    return [event for event in map(json.loads, lines) if event.get("event") == "denied"]


@pytest.fixture(scope="module")
async def images(guarded, etcd, cluster_name):
    async with login(guarded, "admin") as admin:
        await virtual(etcd, cluster_name, [admin], "vdev", ["vsecret", "vteam"], deploy_to="vteam")
        found = {"secret": build_image("secret"), "team": build_image("team"), "only": build_image("only-secret")}
        await push(guarded.url, "vsecret/app", "1", found["secret"], auth=("admin", PASSWORDS["admin"]))
        await push(guarded.url, "vteam/app", "1", found["team"], auth=("admin", PASSWORDS["admin"]))
        await push(guarded.url, "vsecret/only", "1", found["only"], auth=("admin", PASSWORDS["admin"]))
    return found


async def test_node_member_without_pull_is_skipped_and_audited(guarded, images):
    async with login(guarded, "alice") as alice:
        served = await manifest(alice, "vdev/app", "1")
        assert served.status_code == 200, describe(served)
        assert served.content == images["team"].manifest and served.headers[MEMBER] == "vteam/app"
        refused = await manifest(alice, "vdev/only", "1")
        assert refused.status_code == 403 and error_codes(refused) == ["DENIED"], describe(refused)
    audited = [e for e in denials(guarded) if e.get("member") == "vsecret/app"]
    assert audited and audited[-1]["repository"] == "vdev/app" and audited[-1]["action"] == "pull"
    assert any(e.get("member") == "vsecret/only" for e in denials(guarded))


async def test_node_member_with_pull_serves_in_order(guarded, images):
    async with login(guarded, "bob") as bob:
        served = await manifest(bob, "vdev/app", "1")
        assert served.content == images["secret"].manifest and served.headers[MEMBER] == "vsecret/app"


async def test_node_pull_needs_pull_on_the_virtual_name(guarded, images):
    async with login(guarded, "reader") as reader:        # may pull both members, not vdev
        refused = await manifest(reader, "vdev/app", "1")
        assert refused.status_code in (401, 403), describe(refused)


async def test_node_push_needs_push_on_the_target(guarded, images):
    image = build_image("pushed-by-alice")
    await push(guarded.url, "vdev/pushed", "1", image, auth=("alice", PASSWORDS["alice"]))
    async with login(guarded, "alice") as alice:
        assert (await manifest(alice, "vteam/pushed", "1")).content == image.manifest
    async with login(guarded, "bob") as bob:              # push on vdev, only pull on vteam
        refused = await bob.post("/v2/vdev/pushed/blobs/uploads/")
        assert refused.status_code == 403 and error_codes(refused) == ["DENIED"], describe(refused)
    assert any(e.get("member") == "vteam/pushed" and e["action"] == "push" for e in denials(guarded))
