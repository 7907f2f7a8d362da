"""Blob fills through real node processes: three nodes on the session's etcd, a remote
repository declared in etcd, Debian's Distribution (its own access log counts the GETs) or a
paced loopback upstream (wrong bytes, a body held mid-way) in front."""

from __future__ import annotations

import hashlib
import os
import uuid

import anyio
import httpx
import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.repositories.definitions import RemoteRepository
from tests.cluster.conftest import Cluster
from tests.pullthrough.fillkit import PacedBlob, paced_upstream
from tests.support.distribution import DistributionProcess
from tests.support.oci import push_blob, random_bytes
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

BIG = 64 * 1024 * 1024


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def nodes(etcd, tmp_path_factory, request):
    """Three nodes on uvicorn (asyncio) or hypercorn (trio)."""
    cluster = Cluster(etcd.url, tmp_path_factory.mktemp("fill-nodes"), f"fill-nodes-{uuid.uuid4().hex[:8]}")
    started = [cluster.add(f"n{i}", args=["--runtime", request.param]) for i in (1, 2, 3)]
    try:
        yield cluster, started
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def distribution(tmp_path_factory):
    registry = DistributionProcess(tmp_path_factory.mktemp("fill-upstream")).start()
    try:
        yield registry
    finally:
        registry.stop()


async def _declare(cluster: Cluster, nodes, url: str) -> str:
    """A new remote repository of `url`, once every node routes it (a push is refused)."""
    name = f"r{uuid.uuid4().hex[:8]}"
    async with EtcdClient([cluster.etcd_url]) as client:
        await ClusterMetadata(client, cluster.name, "test").define_repository(RemoteRepository(name, url))
    for node in nodes:
        async def refused(node=node) -> bool:
            async with httpx.AsyncClient(base_url=node.url) as http:
                return (await http.post(f"/v2/{name}/x/blobs/uploads/")).status_code == 403
        await eventually(refused, what=f"{node.node_id} routes {name}")
    return name


async def _in_cluster(cluster: Cluster, repo: str, digest: str) -> bool:
    """Whether etcd has the blob linked into `repo` (asked without going through a node)."""
    async with EtcdClient([cluster.etcd_url]) as client:
        return await ClusterMetadata(client, cluster.name, "test").blob_in_repo(repo, digest) is not None


async def _get(url: str, path: str) -> bytes:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        response = await http.get(path)
        assert response.status_code == 200, response.text[:300]
        return response.content


async def _doomed_pull(url: str, path: str) -> None:
    """A pull through a node that the test kills under it."""
    try:
        await _get(url, path)
    except httpx.HTTPError:
        pass


async def test_twenty_concurrent_pulls_through_three_nodes_make_one_upstream_get(nodes, distribution):
    cluster, started = nodes
    data = os.urandom(BIG)
    async with httpx.AsyncClient(base_url=distribution.url, timeout=60) as upstream:
        digest = await push_blob(upstream, "team/big", data)
    name = await _declare(cluster, started, distribution.url)
    path = f"/v2/{name}/team/big/blobs/{digest}"
    bodies: list[bytes] = []

    async def one_pull(i: int) -> None:
        bodies.append(await _get(started[i % 3].url, path))

    async with anyio.create_task_group() as pulls:
        for i in range(20):
            pulls.start_soon(one_pull, i)
    assert len(bodies) == 20
    assert all(hashlib.sha256(body).hexdigest() == digest.partition(":")[2] for body in bodies)
    assert len(distribution.requests(f"/blobs/{digest}", method="GET")) == 1
    # (the last byte goes out once the digest is checked; the blob is published just after)
    await eventually(lambda: _in_cluster(cluster, f"{name}/team/big", digest), what="the filled blob published")


async def test_wrong_bytes_fail_the_pull_and_are_never_cached(nodes):
    cluster, started = nodes
    body = random_bytes(2 * 1024 * 1024, "wrong bytes")
    claimed = "sha256:" + hashlib.sha256(b"the digest the manifest names").hexdigest()
    async with paced_upstream(PacedBlob(claimed, body)) as server:
        name = await _declare(cluster, started, server.url)
        received = bytearray()
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient(base_url=started[0].url, timeout=60) as http:
                async with http.stream("GET", f"/v2/{name}/library/app/blobs/{claimed}") as response:
                    assert response.status_code == 200
                    async for chunk in response.aiter_raw():
                        received.extend(chunk)
        assert len(received) < len(body)        # never the whole (wrong) body
        assert not await _in_cluster(cluster, f"{name}/library/app", claimed)
        assert len(server.gets) == 1


async def test_a_client_that_disconnects_mid_stream_does_not_abort_the_fill(nodes):
    cluster, started = nodes
    paced = PacedBlob.of(8 * 1024 * 1024, "disconnect through a node", pause_at=2 * 1024 * 1024)
    data, digest = paced.body, paced.digest
    async with paced_upstream(paced) as server:
        name = await _declare(cluster, started, server.url)
        path = f"/v2/{name}/library/app/blobs/{digest}"
        async with httpx.AsyncClient(base_url=started[1].url, timeout=60) as http:
            async with http.stream("GET", path) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    assert chunk
                    break                       # the client goes away mid-body
        await paced.paused.wait()
        paced.resume.set()
        await eventually(lambda: _in_cluster(cluster, f"{name}/library/app", digest),
                         what="the fill published after its only client left")
        assert await _get(started[2].url, path) == data
        assert len(server.gets) == 1


async def test_a_node_killed_mid_fill_is_replaced_by_another_and_its_staging_cleaned(nodes):
    cluster, started = nodes
    victim, survivor = started[0], started[1]
    paced = PacedBlob.of(8 * 1024 * 1024, "killed mid-fill", pause_at=5 * 1024 * 1024)   # past one 4 MiB direct write
    data, digest = paced.body, paced.digest
    async with paced_upstream(paced) as server:
        name = await _declare(cluster, started, server.url)
        path = f"/v2/{name}/library/app/blobs/{digest}"
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_doomed_pull, victim.url, path)
            await paced.paused.wait()
            staging = victim.data_dir / "staging"
            await eventually(lambda: any(f.stat().st_size > 0 for f in staging.iterdir()),
                             what="the victim's staging file")
            left_behind = set(staging.iterdir())
            victim.kill()
        paced.resume.set()       # the next fill's GET streams the whole body
        assert await _get(survivor.url, path) == data
        assert len(server.gets) == 2
        await eventually(lambda: _in_cluster(cluster, f"{name}/library/app", digest), what="the blob published")
    await anyio.to_thread.run_sync(victim.start)
    # (the restarted node may be staging a replica of its own by now: only the dead fill's must go)
    assert left_behind and not left_behind & set((victim.data_dir / "staging").iterdir())


async def test_another_nodes_client_streams_the_fill_and_its_retry_survives_the_filler_dying(nodes):
    """Node B's client gets the bytes node A's fill has while A's upstream pauses; A killed
    mid-stream cuts that body short (never a complete wrong one), and the retry through B works."""
    cluster, started = nodes
    filler, other = started[0], started[1]
    paced = PacedBlob.of(8 * 1024 * 1024, "followed, then killed", pause_at=5 * 1024 * 1024)
    data, digest = paced.body, paced.digest
    async with paced_upstream(paced) as server:
        name = await _declare(cluster, started, server.url)
        path = f"/v2/{name}/library/app/blobs/{digest}"
        received = bytearray()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_doomed_pull, filler.url, path)
            await paced.paused.wait()
            with pytest.raises(httpx.HTTPError):
                async with httpx.AsyncClient(base_url=other.url, timeout=60) as http:
                    async with http.stream("GET", f"{path}") as response:
                        assert response.status_code == 200
                        assert int(response.headers["content-length"]) == len(data)
                        async for chunk in response.aiter_raw():
                            received.extend(chunk)
                            if len(received) >= 4 * 1024 * 1024 and filler.proc.poll() is None:
                                assert not paced.resume.is_set()     # streamed while the upstream pauses
                                filler.kill()
        assert 4 * 1024 * 1024 <= len(received) < len(data)
        paced.resume.set()       # the takeover's GET streams the whole body
        assert await _get(other.url, path) == data
        assert len(server.gets) == 2
    await anyio.to_thread.run_sync(filler.start)
