"""BlobFiller against a real etcd, real blob stores and real upstreams (Debian's Distribution,
and a paced loopback upstream for wrong bytes and fills held mid-body), with three in-process
nodes: each follows the cluster's watch and holds its own membership lease, as a node does."""

from __future__ import annotations

import hashlib
import os

import anyio
import httpx
import pytest

from cargohold.oci.reference import parse_digest
from cargohold.pullthrough.staging import GrowingFile
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.errors import DigestMismatch, UpstreamError, UpstreamNotFound, UpstreamUnavailable
from tests.pullthrough.fillkit import PacedBlob, fill_cluster, paced_cluster, pull, remote_route
from tests.support.distribution import DistributionProcess
from tests.support.oci import push_blob, random_bytes
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

BIG = 64 * 1024 * 1024
UPSTREAM_REPO = "team/big"


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    """Nodes run on asyncio (uvicorn) or trio (hypercorn)."""
    return request.param


@pytest.fixture(scope="module")
def upstream_blobs(tmp_path_factory):
    """Distribution with two 64 MiB blobs nobody has pulled (one per event loop)."""
    registry = DistributionProcess(tmp_path_factory.mktemp("distribution")).start()
    blobs = [os.urandom(BIG), os.urandom(BIG)]

    async def push():
        async with httpx.AsyncClient(base_url=registry.url, timeout=60) as client:
            return [await push_blob(client, UPSTREAM_REPO, data) for data in blobs]

    digests = anyio.run(push, backend="trio")
    try:
        yield registry, dict(zip(digests, blobs))
    finally:
        registry.stop()


def _staged_files(node) -> list:
    return list((node.store.root / "staging").iterdir())


async def test_twenty_concurrent_pulls_through_three_nodes_make_one_upstream_get(
        etcd, tmp_path, upstream_blobs, anyio_backend):
    registry, blobs = upstream_blobs
    digest, data = list(blobs.items())[0 if anyio_backend == "trio" else 1]
    the_route = remote_route(registry.url, UPSTREAM_REPO)
    results: list[bytes] = []
    live = GrowingFile.live
    async with fill_cluster(etcd.url, tmp_path) as nodes, UpstreamClient(registry.url) as upstream:
        async def one_pull(i: int) -> None:
            results.append(await pull(nodes, nodes[i % 3], upstream, the_route, digest))

        async with anyio.create_task_group() as pulls:
            for i in range(20):
                pulls.start_soon(one_pull, i)

        assert len(results) == 20 and all(r == data for r in results)
        for node in nodes:      # an ordinary blob of the cluster, linked where it was asked for
            assert await node.metadata.blob_in_repo(the_route.local_name, digest) is not None
            assert _staged_files(node) == []
        fills = sum((node.figures.fills for node in nodes), start=type(nodes[0].figures.fills)())
        assert fills["filled"] == 1 and fills["joined"] == 19
        assert GrowingFile.live == live        # the fill's share of the memory budget is back
        gets = [call for node in nodes for call in node.figures.upstream_calls]
        assert [(m, o, n) for _, m, o, n in gets] == [("GET", "ok", BIG)]
        audited = [event for node in nodes for event in node.audited]
        assert [(e["event"], e["repository"], e["reference"], e["bytes"], e["outcome"]) for e in audited] == \
            [("upstream-fetch", the_route.local_name, digest, BIG, "ok")]
    assert len(registry.requests(f"/blobs/{digest}", method="GET")) == 1


async def test_a_blob_the_cluster_has_is_linked_once_the_upstream_confirms_it(etcd, tmp_path):
    known = PacedBlob.of(1000, "linked")
    data, digest = known.body, known.digest
    async with paced_cluster(etcd.url, tmp_path, known, nodes=2) as (server, nodes, upstream, the_route):
        await nodes[0].store.write(parse_digest(digest), data)
        await nodes[0].metadata.record_blob("local/app", digest, len(data))
        assert await nodes[1].filler.open(upstream, the_route, parse_digest(digest)) is None
        assert await nodes[1].metadata.blob_in_repo(the_route.local_name, digest) is not None
        assert server.gets == [] and len(server.heads) == 1


async def test_a_blob_larger_than_max_blob_size_is_never_cached(etcd, tmp_path):
    """As for uploads, `max_blob_size` bounds what an upstream can make a node store."""
    big = PacedBlob.of(64 * 1024, "too-big")
    async with paced_cluster(etcd.url, tmp_path, big, nodes=1, max_blob_size=4096) as (_, nodes, upstream, the_route):
        with pytest.raises(UpstreamError, match="max_blob_size"):
            await nodes[0].filler.open(upstream, the_route, parse_digest(big.digest))
        assert await nodes[0].metadata.blob_in_repo(the_route.local_name, big.digest) is None
        assert not list(nodes[0].store.staging_path().parent.iterdir())


async def test_a_private_blob_is_never_linked_into_a_cache_whose_upstream_lacks_it(etcd, tmp_path):
    """Blobs are scoped to repositories: asking a remote repository for the digest of a layer
    pushed to a private repository must not hand that layer out (the upstream says 404)."""
    data = random_bytes(1000, "private")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with paced_cluster(etcd.url, tmp_path, nodes=2) as (server, nodes, upstream, the_route):
        await nodes[0].store.write(parse_digest(digest), data)
        await nodes[0].metadata.record_blob("private/app", digest, len(data))
        for node in nodes:
            with pytest.raises(UpstreamNotFound):
                await node.filler.open(upstream, the_route, parse_digest(digest))
            assert await node.metadata.blob_in_repo(the_route.local_name, digest) is None
        assert server.gets == []


async def test_an_upstream_404_propagates_before_any_byte_and_leaves_no_claim(etcd, tmp_path):
    missing = "sha256:" + "ab" * 32
    async with paced_cluster(etcd.url, tmp_path, nodes=1) as (_, nodes, upstream, the_route):
        for _ in range(2):      # no verdict is left behind: the next pull asks again
            with pytest.raises(UpstreamNotFound):
                await nodes[0].filler.open(upstream, the_route, parse_digest(missing))
        assert nodes[0].figures.fills["failed"] == 2
        assert await nodes[0].metadata.blob_in_repo(the_route.local_name, missing) is None


async def test_wrong_bytes_are_never_published_and_every_waiting_pull_fails(etcd, tmp_path):
    body = random_bytes(3 * 1024 * 1024, "wrong")
    claimed = "sha256:" + hashlib.sha256(b"what the manifest said").hexdigest()
    wrong = PacedBlob(claimed, body, pause_at=len(body) // 2)
    live = GrowingFile.live
    async with paced_cluster(etcd.url, tmp_path, wrong, nodes=3) as (server, nodes, upstream, the_route):
        outcomes: list = []

        async def one_pull(node) -> None:
            try:
                blob = await node.filler.open(upstream, the_route, parse_digest(claimed))
                got = b""
                if blob is not None:
                    async for chunk in blob.read(0, blob.size):
                        got += chunk
                outcomes.append(("complete", len(got)))
            except DigestMismatch as exc:
                outcomes.append(("mismatch", str(exc)))

        async with anyio.create_task_group() as pulls:
            for node in nodes:
                pulls.start_soon(one_pull, node)
            await wrong.paused.wait()
            await eventually(lambda: sum(n.waiting() for n in nodes) == 2, what="two nodes waiting for the third")
            wrong.resume.set()

        assert [kind for kind, _ in outcomes] == ["mismatch"] * 3, outcomes
        assert server.gets == [f"/v2/library/app/blobs/{claimed}"]
        for node in nodes:
            assert await node.metadata.blob_in_repo(the_route.local_name, claimed) is None
            assert await node.store.stat(parse_digest(claimed)) is None
            assert _staged_files(node) == []
        assert sum(node.figures.fills["mismatch"] for node in nodes) == 1
        assert GrowingFile.live == live


async def test_an_upstream_breaking_off_mid_body_fails_every_pull_and_publishes_nothing(etcd, tmp_path):
    broken = PacedBlob.of(2 * 1024 * 1024, "broken off", pause_at=1024 * 1024, cut=True)
    digest = broken.digest
    async with paced_cluster(etcd.url, tmp_path, broken, nodes=2) as (server, nodes, upstream, the_route):
        failures: list[BaseException] = []

        async def one_pull(node) -> None:
            try:
                await pull(nodes, node, upstream, the_route, digest)
            except UpstreamUnavailable as exc:
                failures.append(exc)

        async with anyio.create_task_group() as pulls:
            for node in nodes:
                pulls.start_soon(one_pull, node)
            await broken.paused.wait()
            await eventually(lambda: any(n.waiting() for n in nodes), what="a node waiting for the other")
            broken.resume.set()
        assert len(failures) == 2 and len(server.gets) == 1
        for node in nodes:
            assert await node.metadata.blob_in_repo(the_route.local_name, digest) is None
            assert _staged_files(node) == []
        assert sum(node.figures.fills["failed"] for node in nodes) == 1


async def test_an_empty_body_is_checked_before_it_is_served(etcd, tmp_path):
    empty = PacedBlob.of(0, "empty")
    wrong = PacedBlob("sha256:" + "cd" * 32, b"")
    async with paced_cluster(etcd.url, tmp_path, empty, wrong, nodes=1) as (_, nodes, upstream, the_route):
        with pytest.raises(DigestMismatch):     # not a complete 0-byte answer first
            await nodes[0].filler.open(upstream, the_route, parse_digest(wrong.digest))
        assert await pull(nodes, nodes[0], upstream, the_route, empty.digest) == b""


async def test_a_reader_never_gets_the_last_byte_of_an_unverified_blob(tmp_path):
    data = random_bytes(100_000, "unverified")
    digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
    staged = await GrowingFile.create(tmp_path / "staged", digest, len(data))
    received = bytearray()

    async def reader() -> None:
        async for chunk in staged.follow(0, len(data)):
            received.extend(chunk)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(reader)
        staged.receive(data)
        await staged.append([data])
        await staged.hash([data])
        await eventually(lambda: len(received) == len(data) - 1, what="all but the last byte")
        await anyio.sleep(0.1)
        assert len(received) == len(data) - 1
        await staged.verify()
    assert bytes(received) == data
    await staged.discard()


async def test_a_client_that_disconnects_does_not_abort_the_fill(etcd, tmp_path):
    paced = PacedBlob.of(4 * 1024 * 1024, "disconnect", pause_at=1024 * 1024)
    data, digest = paced.body, paced.digest
    async with paced_cluster(etcd.url, tmp_path, paced, nodes=2) as (server, nodes, upstream, the_route):
        with anyio.CancelScope() as client:       # the request's scope: cancelled when its client goes
            blob = await nodes[0].filler.open(upstream, the_route, parse_digest(digest))
            async for chunk in blob.read(0, blob.size):
                assert chunk
                client.cancel()
        paced.resume.set()
        await eventually(lambda: nodes[0].metadata.blob_in_repo(the_route.local_name, digest),
                         what="the fill published after its client left")
        assert await pull(nodes, nodes[1], upstream, the_route, digest) == data
        assert len(server.gets) == 1


async def test_a_node_stopping_mid_fill_hands_it_to_a_waiting_node(etcd, tmp_path):
    paced = PacedBlob.of(4 * 1024 * 1024, "handover", pause_at=1024 * 1024)
    data, digest = paced.body, paced.digest
    async with paced_cluster(etcd.url, tmp_path, paced, nodes=2) as (server, nodes, upstream, the_route):
        first, second = nodes
        assert await first.filler.open(upstream, the_route, parse_digest(digest)) is not None
        await paced.paused.wait()
        got: list[bytes] = []

        async def waiting_pull() -> None:
            got.append(await pull(nodes, second, upstream, the_route, digest))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(waiting_pull)
            await eventually(second.waiting, what="the second node waiting")
            first.stop()
            paced.resume.set()
        assert got == [data]
        assert len(server.gets) == 2
        await eventually(lambda: second.figures.fills["filled"] == 1, what="the second node's fill counted")
        assert await second.metadata.blob_in_repo(the_route.local_name, digest) is not None
