"""Two nodes, one on asyncio and one on trio, resolve a virtual name the same: a push through
one node is what the other serves at once (one read barrier per request), and a remote image
cached through one is served by the other from the cache."""

from __future__ import annotations

import pytest

from tests.pullthrough.conftest import REPO, client_of, push, remote, running_node, unique
from tests.pullthrough.conftest import node, upstream    # noqa: F401  (fixtures)
from tests.support.oci import build_image, describe
from tests.virtual.nodekit import MEMBER, get_ok, manifest, virtual

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def second(tmp_path_factory, etcd, cluster_name, node):  # noqa: F811
    with running_node(tmp_path_factory.mktemp("second"), etcd, cluster_name, node_id="n2", runtime="trio") as process:
        yield process


async def test_node_two_runtimes_resolve_the_same(etcd, cluster_name, node, second, upstream):  # noqa: F811
    assert {node.runtime, second.runtime} == {"asyncio", "trio"}
    async with client_of(node) as one, client_of(second) as other:
        hub = await remote(etcd, cluster_name, one, upstream.url)
        team, dev = unique("team"), unique("dev")
        await virtual(etcd, cluster_name, [one, other], dev, [team, hub.name], deploy_to=team)
        name = f"{dev}/{REPO}"

        cached = await manifest(one, name, "v1")             # fetched by one node ...
        assert cached.headers["x-cargohold-cache"] == "miss", describe(cached)
        elsewhere = await manifest(other, name, "v1")         # ... a hit on the other
        assert elsewhere.content == upstream.image.manifest, describe(elsewhere)
        assert elsewhere.headers[MEMBER] == f"{hub.name}/{REPO}" and elsewhere.headers["x-cargohold-cache"] == "hit"

        local = build_image("cluster-shadow")
        await push(one.base_url, name, "v1", local)          # acknowledged by one: the other sees it at once
        for client in (one, other):
            served = await manifest(client, name, "v1")
            assert served.content == local.manifest and served.headers[MEMBER] == f"{team}/{REPO}", describe(served)
            for blob_digest, data in local.blobs.items():
                assert (await get_ok(client, f"/v2/{name}/blobs/{blob_digest}")).content == data
        tags = [(await get_ok(c, f"/v2/{name}/tags/list")).json() for c in (one, other)]
        assert tags[0] == tags[1] == {"name": name, "tags": ["multi", "v1"]}
