"""Other nodes stream a fill from the filling node (gRPC FollowFill) instead of waiting for it:
in-process nodes on the session's real etcd, each with its real gRPC replication server, and a
paced loopback upstream that holds a body mid-way."""

from __future__ import annotations

import gc
import hashlib
import time

import anyio
import grpc
import pytest

from cargohold.auth.peer import PeerSecrets
from cargohold.blobs.remote import ContentUnavailable
from cargohold.oci.reference import parse_digest
from cargohold.pullthrough.fill import FollowedBlob
from cargohold.pullthrough.staging import GrowingFile
from cargohold.replication.transfer import FillNotFollowed, PeerClient, PeerUnavailable, ReplicationService, grpc_server
from cargohold.upstream.client import UpstreamClient
from cargohold.upstream.errors import DigestMismatch, UpstreamNotFound
from tests.pullthrough.fillkit import PacedBlob, paced_cluster, paced_upstream, pull, read_all, remote_route
from tests.support.oci import random_bytes
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    """The filler hands its staging file to grpc's threads through the event loop's token: both loops."""
    return request.param


async def _start_fill(node, upstream, the_route, paced: PacedBlob) -> None:
    """`node` claims and starts the fill (its own client's stream is not read)."""
    assert await node.filler.open(upstream, the_route, parse_digest(paced.digest)) is not None
    await paced.paused.wait()


async def _follow(node, upstream, the_route, digest: str) -> FollowedBlob:
    blob = await node.filler.open(upstream, the_route, parse_digest(digest))
    assert isinstance(blob, FollowedBlob), blob
    return blob


async def test_a_client_of_another_node_gets_the_first_bytes_while_the_fill_is_paused(etcd, tmp_path):
    paced = PacedBlob.of(6 * MiB, "followed", pause_at=3 * MiB)
    async with paced_cluster(etcd.url, tmp_path, paced, follow=True) as (server, nodes, upstream, the_route):
        filler, follower = nodes
        await _start_fill(filler, upstream, the_route, paced)
        blob = await _follow(follower, upstream, the_route, paced.digest)
        assert blob.size == len(paced.body)
        assert await read_all(blob, MiB, 1000) == paced.body[MiB:MiB + 1000]      # a Range request
        received = bytearray()
        async with anyio.create_task_group() as tasks:
            async def client() -> None:
                async for chunk in blob.read(0, blob.size):
                    received.extend(chunk)
            tasks.start_soon(client)
            await eventually(lambda: len(received) >= 2 * MiB, what="bytes while the upstream pauses")
            assert not paced.resume.is_set() and len(received) <= 3 * MiB
            paced.resume.set()
        assert hashlib.sha256(received).hexdigest() == paced.digest.partition(":")[2]
        assert len(server.gets) == 1
        assert follower.figures.fills["followed"] == 1
        # the follower's node still links the published blob into its repository, as a waiting one does
        await eventually(lambda: follower.metadata.blob_in_repo(the_route.local_name, paced.digest),
                         what="the blob published")
        assert await pull(nodes, follower, upstream, the_route, paced.digest) == paced.body
        assert len(server.gets) == 1


async def test_wrong_bytes_never_reach_a_follower_complete(etcd, tmp_path):
    body = random_bytes(4 * MiB, "wrong, followed")
    claimed = "sha256:" + hashlib.sha256(b"what the manifest said").hexdigest()
    wrong = PacedBlob(claimed, body, pause_at=2 * MiB)
    async with paced_cluster(etcd.url, tmp_path, wrong, follow=True) as (server, nodes, upstream, the_route):
        filler, follower = nodes
        await _start_fill(filler, upstream, the_route, wrong)
        blob = await _follow(follower, upstream, the_route, claimed)
        received = bytearray()
        with pytest.raises(ContentUnavailable, match="the fill failed"):
            async for chunk in blob.read(0, blob.size):
                received.extend(chunk)
                wrong.resume.set()
        assert 0 < len(received) < len(body)
        await eventually(lambda: not follower.filler._fills, what="the follower's node learning the verdict")
        assert len(server.gets) == 1
        assert await follower.metadata.blob_in_repo(the_route.local_name, claimed) is None


async def test_a_filler_stopping_mid_stream_cuts_its_followers_short_and_a_retry_works(etcd, tmp_path):
    paced = PacedBlob.of(6 * MiB, "filler stops", pause_at=3 * MiB)
    async with paced_cluster(etcd.url, tmp_path, paced, follow=True) as (server, nodes, upstream, the_route):
        filler, follower = nodes
        await _start_fill(filler, upstream, the_route, paced)
        blob = await _follow(follower, upstream, the_route, paced.digest)
        received = bytearray()
        with pytest.raises(ContentUnavailable):
            async for chunk in blob.read(0, blob.size):
                received.extend(chunk)
                if len(received) >= MiB:
                    filler.stop()            # its fill is cancelled; its gRPC server still answers
        assert len(received) < len(paced.body)
        paced.resume.set()                   # the takeover's GET streams the whole body
        assert await pull(nodes, follower, upstream, the_route, paced.digest) == paced.body
        assert len(server.gets) == 2


async def test_a_follower_that_disconnects_does_not_disturb_the_fill(etcd, tmp_path):
    paced = PacedBlob.of(6 * MiB, "follower leaves", pause_at=3 * MiB)
    async with paced_cluster(etcd.url, tmp_path, paced, follow=True) as (server, nodes, upstream, the_route):
        filler, follower = nodes
        blob = await filler.filler.open(upstream, the_route, parse_digest(paced.digest))
        await paced.paused.wait()
        followed = await _follow(follower, upstream, the_route, paced.digest)
        with anyio.CancelScope() as client:       # the request's scope: cancelled when its client goes
            async for chunk in followed.read(0, followed.size):
                assert filler.service.followers == 1
                client.cancel()
        # the filler's gRPC pool thread lets go of the stream while the fill is still paused
        await eventually(lambda: filler.service.followers == 0, what="the follower's stream ended on the filler")
        again = await _follow(follower, upstream, the_route, paced.digest)
        assert await read_all(again, 0, 10) == paced.body[:10]
        paced.resume.set()
        assert await read_all(blob) == paced.body
        assert await read_all(again) == paced.body
        await eventually(lambda: filler.metadata.blob_in_repo(the_route.local_name, paced.digest),
                         what="the fill published")
        assert len(server.gets) == 1


async def test_a_follower_that_never_reads_frees_the_fillers_thread(etcd, tmp_path):
    """A HEAD request opens the fill (its size is the answer's Content-Length) and drops it unread."""
    paced = PacedBlob.of(4 * MiB, "head only", pause_at=MiB)
    async with paced_cluster(etcd.url, tmp_path, paced, follow=True) as (server, nodes, upstream, the_route):
        filler, follower = nodes
        await _start_fill(filler, upstream, the_route, paced)
        blob = await _follow(follower, upstream, the_route, paced.digest)
        assert blob.size == len(paced.body) and filler.service.followers == 1
        del blob
        gc.collect()
        await eventually(lambda: filler.service.followers == 0, what="the unread call ended on the filler")
        paced.resume.set()
        await eventually(lambda: filler.metadata.blob_in_repo(the_route.local_name, paced.digest),
                         what="the fill published")


async def test_a_filling_node_with_no_room_for_followers_leaves_them_waiting_as_before(etcd, tmp_path):
    paced = PacedBlob.of(4 * MiB, "no room", pause_at=MiB)
    async with paced_cluster(etcd.url, tmp_path, paced, follow=True, max_followers=0) as \
            (server, nodes, upstream, the_route):
        filler, follower = nodes
        await _start_fill(filler, upstream, the_route, paced)
        got: list[bytes] = []
        async with anyio.create_task_group() as tasks:
            async def waiting_pull() -> None:
                got.append(await pull(nodes, follower, upstream, the_route, paced.digest))
            tasks.start_soon(waiting_pull)
            await eventually(follower.waiting, what="the follower's node waiting")
            await anyio.sleep(0.3)
            assert got == []
            paced.resume.set()
        assert got == [paced.body] and len(server.gets) == 1


async def test_a_fill_that_stalls_ends_its_followers_streams(etcd, tmp_path):
    paced = PacedBlob.of(4 * MiB, "stalled", pause_at=MiB)
    async with paced_cluster(etcd.url, tmp_path, paced, follow=True, stall_timeout=1.0) as \
            (server, nodes, upstream, the_route):
        filler, follower = nodes
        await _start_fill(filler, upstream, the_route, paced)
        blob = await _follow(follower, upstream, the_route, paced.digest)
        received = bytearray()
        with anyio.fail_after(20), pytest.raises(ContentUnavailable, match="no progress"):
            async for chunk in blob.read(0, blob.size):
                received.extend(chunk)
        assert 0 < len(received) <= MiB
        paced.resume.set()        # (the fill itself goes on: the upstream client's read timeout bounds it)
        await eventually(lambda: filler.metadata.blob_in_repo(the_route.local_name, paced.digest),
                         what="the fill published")


async def test_a_reader_on_another_thread_never_gets_the_last_byte_of_an_unverified_blob(tmp_path):
    data = random_bytes(100_000, "unverified, on a thread")
    digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
    staged = await GrowingFile.create(tmp_path / "staged", digest, len(data))
    tail = staged.tail()
    assert tail.readable(0, 0.01) == 0
    staged.receive(data)
    await staged.append([data])
    await staged.hash([data])
    assert await anyio.to_thread.run_sync(tail.readable, 0, 0.01) == len(data) - 1
    assert await anyio.to_thread.run_sync(tail.readable, len(data) - 1, 0.2) == len(data) - 1
    await staged.verify()
    assert tail.readable(len(data) - 1, 0.01) == len(data)
    assert tail.read(0, len(data)) == data
    tail.close()
    await staged.discard()


async def test_a_reader_on_another_thread_raises_the_fills_error(tmp_path):
    data = random_bytes(1000, "failing, on a thread")
    staged = await GrowingFile.create(tmp_path / "staged", parse_digest("sha256:" + "ab" * 32), len(data))
    tail = staged.tail()
    staged.receive(data)
    await staged.append([data])
    await staged.hash([data])
    with pytest.raises(DigestMismatch):
        await staged.verify()
    staged.fail(DigestMismatch("wrong bytes"))
    with pytest.raises(DigestMismatch):
        tail.readable(0, 0.01)
    tail.close()
    await staged.discard()


async def test_following_a_fill_takes_the_peer_credential():
    """The peer interceptor covers FollowFill like every method: no credential, UNAUTHENTICATED;
    a signed call reaches the servicer (which has no fill of that digest here)."""
    keyring = PeerSecrets.generate(time.time())
    service = ReplicationService(lambda digest: None, lambda digest: True)
    async with grpc_server("127.0.0.1:0", service, keyring=lambda: keyring) as port:
        address = f"127.0.0.1:{port}"
        stranger, peer = PeerClient(), PeerClient(keyring=lambda: keyring)
        try:
            with pytest.raises(PeerUnavailable) as refused:
                await stranger.follow_fill(address, "sha256:" + "ab" * 32)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(FillNotFollowed) as not_here:
                await peer.follow_fill(address, "sha256:" + "ab" * 32)
            assert not_here.value.code == grpc.StatusCode.NOT_FOUND
        finally:
            stranger.close()
            peer.close()


async def test_a_fill_for_another_repository_is_followed_only_once_our_upstream_confirms_the_blob(etcd, tmp_path):
    """Blobs are scoped to repositories: a client of a cache whose upstream lacks a digest must
    not stream another repository's fill of it (a private layer, say) by asking for the digest."""
    private = PacedBlob.of(4 * MiB, "private, being filled", pause_at=MiB)
    async with paced_cluster(etcd.url, tmp_path, private, follow=True) as (server, nodes, upstream, the_route), \
            paced_upstream() as empty, UpstreamClient(empty.url) as other_upstream:
        filler, asker = nodes
        await _start_fill(filler, upstream, the_route, private)
        elsewhere = remote_route(empty.url, "library/app", repository="other")
        with pytest.raises(UpstreamNotFound):
            await asker.filler.open(other_upstream, elsewhere, parse_digest(private.digest))
        assert empty.gets == []           # (it answered the confirming HEAD 404)
        assert asker.figures.fills["followed"] == 0
        private.resume.set()
        # a client of the same repository follows as before
        assert await read_all(await _follow(asker, upstream, the_route, private.digest)) == private.body
