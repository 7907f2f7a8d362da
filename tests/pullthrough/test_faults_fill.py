"""Blob fills under load and failure, through all three nodes: twenty concurrent pulls of one
uncached 64 MiB blob cost the upstream one GET (its own access log says so), and a node killed
while it streams a blob from the upstream does not stop a pull through another node."""

from __future__ import annotations

import hashlib
import time
import uuid

import anyio
import httpx
import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.oci import describe, digest, random_bytes, with_query

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def _seed_blob(upstream, name: str, size: int) -> tuple[str, bytes]:
    """Push `size` random bytes to the upstream as a blob of `name` (POST, then PUT ?digest)."""
    data = random_bytes(size, seed=uuid.uuid4().hex)
    blob = digest(data)
    with httpx.Client(base_url=upstream.url, timeout=60) as client:
        started = client.post(f"/v2/{name}/blobs/uploads/")
        assert started.status_code == 202, describe(started)
        done = client.put(with_query(started.headers["Location"], digest=blob), content=data)
        assert done.status_code == 201, describe(done)
    return blob, data


async def _pulled_digest(client: httpx.AsyncClient, url: str) -> str:
    """Stream `url` to the end; the sha256 of what came (hashed as it arrives)."""
    hasher = hashlib.sha256()
    async with client.stream("GET", url) as response:
        assert response.status_code == 200, (url, response.status_code, await response.aread())
        async for chunk in response.aiter_bytes(MiB):
            hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


async def test_twenty_concurrent_pulls_through_three_nodes_fetch_the_blob_once(upstreams, cache_cluster,
                                                                               remote_name):
    upstream = upstreams.distribution()
    blob, _ = _seed_blob(upstream, "library/big", 64 * MiB)
    await anyio.to_thread.run_sync(cache_cluster.add_remote, remote_name, upstream.url)
    urls = [f"{node.url}/v2/{remote_name}/library/big/blobs/{blob}" for node in cache_cluster.members]
    pulled: list[str] = []

    async def pull(url: str) -> None:
        pulled.append(await _pulled_digest(client, url))

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=40)) as client:
        with anyio.fail_after(150):
            async with anyio.create_task_group() as pulls:
                for i in range(20):
                    pulls.start_soon(pull, urls[i % len(urls)])

    assert pulled == [blob] * 20
    gets = await anyio.to_thread.run_sync(upstream.logged, f"/blobs/{blob}", "GET")
    assert len(gets) == 1, gets


def test_a_node_killed_mid_fill_does_not_stop_a_pull_through_another(upstreams, cache_cluster, remote_name,
                                                                      restart_killed):
    upstream = upstreams.distribution()
    blob, data = _seed_blob(upstream, "library/slow", 8 * MiB)
    slow_link = FaultProxy(upstream.process.port, cut_after=1 << 62, cut_connections=0, rate=4 * MiB)
    try:
        cache_cluster.add_remote(remote_name, f"http://{slow_link.address}")
        victim, survivor = cache_cluster.members[0], cache_cluster.members[1]
        path = f"/v2/{remote_name}/library/slow/blobs/{blob}"

        with httpx.stream("GET", victim.url + path, timeout=60) as response:   # the victim is filling...
            assert response.status_code == 200
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received >= MiB:
                    break
            victim.kill()                                                     # ...and dies mid-stream

        started = time.monotonic()
        response = httpx.get(survivor.url + path, timeout=90)
        assert response.status_code == 200 and digest(response.content) == blob, response.status_code
        print(f"survivor served the blob {time.monotonic() - started:.1f}s after the filler died")
        cache_cluster.wait_until(lambda: blob in cache_cluster.holders(),
                                 what="the filled blob is an ordinary blob of the cluster")
        # the survivor took the fill over: the victim's cut-off GET and its own, nobody else's
        assert len(upstream.logged(f"/blobs/{blob}", "GET")) == 2
    finally:
        slow_link.close()
