"""The cache is the cluster's, not a node's: what one node fetched or revalidated, another
serves without asking the upstream again (one HEAD per ttl for the whole cluster). The second
node runs on trio (hypercorn), the first on asyncio (uvicorn)."""

from __future__ import annotations

import anyio
import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from tests.pullthrough.conftest import REPO, client_of, remote, running_node, wait_routed
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

MANIFESTS = f"/v2/{REPO}/manifests/"


@pytest.fixture(scope="module")
def second(tmp_path_factory, etcd, cluster_name, node):
    with running_node(tmp_path_factory.mktemp("second"), etcd, cluster_name, node_id="n2", runtime="trio") as process:
        yield process


@pytest.fixture
async def other(second):
    async with client_of(second) as c:
        yield c


async def test_cache_fetched_by_one_node_served_by_another(etcd, cluster_name, client, other, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=3600)
    path = f"/v2/{hub.name}/{REPO}/manifests/v1"
    assert (await client.get(path)).headers["x-cargohold-cache"] == "miss"
    before = upstream.count(MANIFESTS)
    there = await other.get(path)
    assert there.status_code == 200 and there.content == upstream.image.manifest
    assert there.headers["x-cargohold-cache"] == "hit"
    assert upstream.count(MANIFESTS) == before


async def test_cache_one_revalidation_per_ttl_for_the_cluster(etcd, cluster_name, client, other, upstream):
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=2)
    path = f"/v2/{hub.name}/{REPO}/manifests/v1"
    assert (await client.get(path)).status_code == 200
    assert (await other.get(path)).headers["x-cargohold-cache"] == "hit"
    await anyio.sleep(2.2)
    heads = upstream.count(MANIFESTS, "HEAD")
    assert (await client.get(path)).headers["x-cargohold-cache"] == "revalidated"
    assert (await other.get(path)).headers["x-cargohold-cache"] == "hit"     # node 1's check counts here
    assert upstream.count(MANIFESTS, "HEAD") == heads + 1


async def test_cache_miss_on_the_trio_node_served_by_the_other(etcd, cluster_name, client, other, upstream):
    hub = await remote(etcd, cluster_name, other, upstream.url, ttl=3600)
    await wait_routed(client, hub.name)
    name = f"{hub.name}/{REPO}"
    fetched = await other.get(f"/v2/{name}/manifests/v1")
    assert fetched.status_code == 200 and fetched.headers["x-cargohold-cache"] == "miss"
    layer, data = next(iter(upstream.image.blobs.items()))
    streamed = await other.get(f"/v2/{name}/blobs/{layer}")
    assert streamed.status_code == 200 and streamed.content == data
    assert (await client.get(f"/v2/{name}/manifests/v1")).headers["x-cargohold-cache"] == "hit"

    async def served_here():
        response = await client.get(f"/v2/{name}/blobs/{layer}")
        return response if response.headers["x-cargohold-cache"] == "hit" else None
    assert (await eventually(served_here, what="the blob filled by n2 served by n1")).content == data


async def _holders(etcd, cluster: str, digest: str) -> set[str]:
    async with EtcdClient([etcd.url]) as etcd_client:
        metadata = ClusterMetadata(etcd_client, cluster, "test")
        await metadata.load()
        state = metadata.blob_states().get(digest)
        return set(state.nodes) if state is not None else set()


async def test_cache_manifest_replicates_before_its_blobs_are_fetched(etcd, cluster_name, client, second,
                                                                      upstream):
    """Blobs come on demand, maybe never: the manifest's bytes must not wait for them to reach
    a second node (losing the node that fetched it would lose the cached manifest)."""
    hub = await remote(etcd, cluster_name, client, upstream.url, ttl=3600)
    index = await client.get(f"/v2/{hub.name}/{REPO}/manifests/multi")
    assert index.status_code == 200

    async def on_both() -> bool:
        return await _holders(etcd, cluster_name, upstream.index.digest) == {"n1", "n2"}
    await eventually(on_both, what="the cached index copied to both nodes")
