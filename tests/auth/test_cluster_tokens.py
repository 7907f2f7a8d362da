"""Two nodes on one etcd, one cluster: a token issued by node A is accepted by node B (no etcd
round trip: both hold the signing keys from their own watch of auth/), accounts added or removed
while both run take effect on both, and key rotation keeps or drops older tokens as asked."""

from __future__ import annotations

import httpx
import pytest

from tests.auth.conftest import cli, start_secured
from tests.support.oci import build_image, describe, push_image
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def pair(tmp_path_factory, etcd, cluster_name):
    a = start_secured(tmp_path_factory, etcd, cluster_name, node_id="a")
    b = start_secured(tmp_path_factory, etcd, cluster_name, node_id="b", runtime="trio", provision_accounts=False)
    try:
        yield a, b
    finally:
        b.node.stop()
        a.node.stop()


async def _token(url: str, user: str, password: str, scope: str) -> str:
    async with httpx.AsyncClient(base_url=url) as c:
        r = await c.get("/token", params={"scope": scope}, auth=(user, password))
        assert r.status_code == 200, describe(r)
        return r.json()["token"]


async def _status(url: str, token: str, path: str) -> int:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
        return (await c.get(path)).status_code


async def test_tokens_from_one_node_work_on_the_other(pair):
    a, b = pair
    image = build_image("two-nodes")
    async with a.client("alice") as alice:
        await push_image(alice, "team/shared", "latest", image)
    token = await _token(a.url, "alice", "alice-password", "repository:team/shared:pull")
    async with httpx.AsyncClient(base_url=b.url, headers={"Authorization": f"Bearer {token}",
                                                            "Accept": image.media_type}) as c:
        r = await c.get("/v2/team/shared/manifests/latest")
        assert r.status_code == 200 and r.content == image.manifest, describe(r)
        assert (await c.delete("/v2/team/shared/manifests/latest")).status_code == 401   # still only pull
    token_b = await _token(b.url, "reader", "reader-password", "repository:team/shared:pull")
    assert await _status(a.url, token_b, "/v2/team/shared/tags/list") == 200
    assert a.service == b.service


async def test_accounts_changed_while_running_apply_on_both_nodes(pair):
    a, b = pair
    added = cli("user", "add", "dave", "--group", "devs", "--password-stdin", "--bcrypt-cost", "4",
                input="dave-password\n", etcd=a.etcd_url, cluster=a.cluster)
    assert added.returncode == 0, added.stderr
    for node in (a, b):
        async def can_log_in(url=node.url) -> bool:
            async with httpx.AsyncClient(base_url=url, auth=("dave", "dave-password")) as c:
                return (await c.get("/v2/")).status_code == 200
        await eventually(can_log_in)
    token = await _token(a.url, "dave", "dave-password", "repository:team/shared:pull")
    assert await _status(b.url, token, "/v2/team/shared/tags/list") == 200
    removed = cli("user", "remove", "dave", etcd=a.etcd_url, cluster=a.cluster)
    assert removed.returncode == 0, removed.stderr

    async def refused() -> bool:
        return await _status(b.url, token, "/v2/team/shared/tags/list") == 401
    await eventually(refused)


async def test_key_rotation(pair):
    a, b = pair
    old = await _token(a.url, "reader", "reader-password", "repository:team/shared:pull")
    rotated = cli("access", "rotate-key", etcd=a.etcd_url, cluster=a.cluster)
    assert rotated.returncode == 0, rotated.stderr

    async def new_key_in_use() -> bool:
        token = await _token(a.url, "reader", "reader-password", "repository:team/shared:pull")
        return token.split(".")[0] != old.split(".")[0] and await _status(b.url, token, "/v2/") == 200
    await eventually(new_key_in_use)
    assert await _status(b.url, old, "/v2/") == 200              # the previous key still verifies
    dropped = cli("access", "rotate-key", "--drop-old", etcd=a.etcd_url, cluster=a.cluster)
    assert dropped.returncode == 0, dropped.stderr

    async def old_refused() -> bool:
        return await _status(a.url, old, "/v2/") == 401 and await _status(b.url, old, "/v2/") == 401
    await eventually(old_refused)
