"""Faults: clients that vanish, a node killed with SIGKILL, etcd restarting under a node.

Invariants checked (DESIGN.md):
1. a blob or manifest acknowledged with 201 is readable afterwards;
2. bytes served under a digest always hash to that digest, and nothing partial is ever
   visible under a digest (HEAD of an in-flight digest is 404, or the full content);
plus: the node recovers from an etcd restart without being restarted and misses no event.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import uuid
from pathlib import Path

import anyio
import httpx
import pytest

from tests.support.node import NodeProcess
from tests.support.poll import PATIENCE, eventually, until
from tests.support.oci import (
    ACCEPT_ALL, Image, build_image, describe, digest, error_codes, push_blob, push_image,
    push_manifest, random_bytes, with_query,
)

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


# -- helpers -----------------------------------------------------------------------------------
def files_named(root: Path, hexdigest: str) -> list[Path]:
    return [Path(dp) / f for dp, _, fs in os.walk(root) for f in fs if hexdigest in f]


def assert_no_bad_file_under_digest(root: Path, d: str) -> None:
    """Any file on disk named after ``d`` must hash to ``d``: a complete blob or nothing.

    (Temp files are not named after the digest they are meant to become.)
    """
    algo, hexd = d.split(":")
    for path in files_named(root, hexd):
        data = path.read_bytes()
        assert hashlib.new(algo, data).hexdigest() == hexd, f"{path} is under {d} but does not hash to it"


async def assert_blob_intact(client, repo: str, d: str, data: bytes) -> None:
    r = await client.get(f"/v2/{repo}/blobs/{d}")
    assert r.status_code == 200, describe(r)
    assert r.content == data
    assert digest(r.content, d.split(":")[0]) == d


async def assert_not_visible_or_complete(client, repo: str, d: str, data: bytes) -> None:
    r = await client.head(f"/v2/{repo}/blobs/{d}")
    if r.status_code == 404:
        g = await client.get(f"/v2/{repo}/blobs/{d}")
        assert g.status_code == 404, describe(g)
        return
    assert r.status_code == 200, describe(r)
    assert int(r.headers["Content-Length"]) == len(data), describe(r)
    await assert_blob_intact(client, repo, d, data)


def start_body(port: int, head: bytes) -> socket.socket:
    """Open a request whose handler has begun reading its body.

    The head asks for "100 Continue", which the server sends when the handler starts reading
    the body: whatever the test does next hits a request that is consuming its body (an RST
    before that would discard the request unread)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
    try:
        s.sendall(head.removesuffix(b"\r\n") + b"Expect: 100-continue\r\n\r\n")
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += s.recv(4096) or b"(closed)\r\n\r\n"
        assert interim.startswith(b"HTTP/1.1 100 "), interim
    except BaseException:
        s.close()
        raise
    return s


async def raw_send_then_drop(port: int, head: bytes, body_part: bytes, reset: bool) -> None:
    """Send a request head and, once the server reads the body, part of it; then vanish."""
    def run():
        with start_body(port, head) as s:
            s.sendall(body_part)
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await anyio.to_thread.run_sync(run)


def saw_disconnect(node: NodeProcess, method: str, target: str) -> None:
    """Wait until the node's access log says it noticed the client of this request vanish."""
    line = f"{method} {httpx.URL(target).path} client disconnected"
    until(lambda: line in node.log_path.read_text(errors="replace"), what=line)


def request_head(method: str, target: str, port: int, length: int, ctype: str) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n\r\n").encode()


def target_of(location: str) -> str:
    url = httpx.URL(location)
    return url.raw_path.decode()


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crash_cluster() -> str:
    return f"t-faults-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["asyncio", "trio"])
def fresh_node(request, etcd, tmp_path, crash_cluster):
    """A node of its own (it gets killed), on the session etcd."""
    n = NodeProcess(tmp_path / "node", etcd_url=etcd.url,
                    cluster=f"{crash_cluster}-{uuid.uuid4().hex[:6]}", runtime=request.param)
    n.start()
    try:
        yield n
    finally:
        n.kill()


@pytest.fixture
def asyncio_node(etcd, tmp_path, crash_cluster):
    n = NodeProcess(tmp_path / "node", etcd_url=etcd.url,
                    cluster=f"{crash_cluster}-{uuid.uuid4().hex[:6]}", runtime="asyncio")
    n.start()
    try:
        yield n
    finally:
        n.kill()


def new_client(node: NodeProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=node.url, timeout=httpx.Timeout(30.0))


async def restart_after_kill(node: NodeProcess) -> None:
    await anyio.to_thread.run_sync(node.start)


# -- client disconnects -------------------------------------------------------------------------
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_client_disconnect_mid_put_leaves_nothing(fresh_node, reset):
    node = fresh_node
    repo = "faults/disconnect"
    data = random_bytes(4 * MiB, f"disconnect-{reset}")
    d = digest(data)
    async with new_client(node) as c:
        r = await c.post(f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        assert r.status_code == 202, describe(r)
        location = r.headers["Location"]
        target = target_of(with_query(location, digest=d))
        head = request_head("PUT", target, node.port, len(data), "application/octet-stream")
        await raw_send_then_drop(node.port, head, data[: len(data) // 2], reset)

        # never visible, also once the server is done with the dropped request
        await anyio.to_thread.run_sync(saw_disconnect, node, "PUT", target)
        r = await c.head(f"/v2/{repo}/blobs/{d}")
        assert r.status_code == 404, describe(r)
        assert_no_bad_file_under_digest(node.data_dir, d)

        # the server still works: the same blob can be pushed properly
        await push_blob(c, repo, data)
        await assert_blob_intact(c, repo, d, data)


async def test_client_disconnect_mid_monolithic_post(fresh_node):
    node = fresh_node
    repo = "faults/disconnect-post"
    data = random_bytes(3 * MiB, "disconnect-post")
    d = digest(data)
    head = request_head("POST", f"/v2/{repo}/blobs/uploads/?digest={d}", node.port, len(data),
                        "application/octet-stream")
    await raw_send_then_drop(node.port, head, data[: MiB], reset=False)
    async with new_client(node) as c:
        r = await c.head(f"/v2/{repo}/blobs/{d}")
        assert r.status_code == 404, describe(r)
        assert_no_bad_file_under_digest(node.data_dir, d)
        r = await c.get("/v2/")
        assert r.status_code == 200, describe(r)
        await push_blob(c, repo, data)
        await assert_blob_intact(c, repo, d, data)


async def test_client_disconnect_mid_patch_can_resume(fresh_node):
    """A chunk cut off mid-way: whatever Range the upload reports afterwards, resuming
    from it must give exactly the right blob."""
    node = fresh_node
    repo = "faults/disconnect-patch"
    data = random_bytes(3 * MiB, "disconnect-patch")
    d = digest(data)
    async with new_client(node) as c:
        r = await c.post(f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        assert r.status_code == 202, describe(r)
        location = r.headers["Location"]
        r = await c.patch(location, content=data[:MiB],
                          headers={"Content-Range": f"0-{MiB - 1}", "Content-Type": "application/octet-stream"})
        assert r.status_code == 202, describe(r)
        location = r.headers["Location"]
        head = (f"PATCH {target_of(location)} HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Range: {MiB}-{len(data) - 1}\r\n"
                f"Content-Length: {len(data) - MiB}\r\n\r\n").encode()
        await raw_send_then_drop(node.port, head, data[MiB: MiB + MiB // 2], reset=False)

        async def status():
            st = await c.get(location)
            assert st.status_code == 204, describe(st)
            return st
        st = await eventually(status, what="upload status after a dropped PATCH")
        start, end = st.headers["Range"].split("-")
        assert start == "0"
        offset = int(end) + 1
        assert MiB <= offset <= MiB + MiB // 2, st.headers["Range"]
        r = await c.patch(st.headers["Location"], content=data[offset:],
                          headers={"Content-Range": f"{offset}-{len(data) - 1}",
                                   "Content-Type": "application/octet-stream"})
        assert r.status_code == 202, describe(r)
        r = await c.put(with_query(r.headers["Location"], digest=d))
        assert r.status_code == 201, describe(r)
        await assert_blob_intact(c, repo, d, data)


# -- kill -9 ------------------------------------------------------------------------------------
async def push_acknowledged(c, repo: str, n: int) -> tuple[dict[str, bytes], list[Image]]:
    blobs: dict[str, bytes] = {}
    images = []
    for i in range(n):
        data = random_bytes(256 * 1024 + i, f"acked-{repo}-{i}")
        blobs[await push_blob(c, repo, data)] = data
        img = build_image(f"acked-{repo}-{i}", layers=1)
        await push_image(c, repo, f"t{i}", img)
        images.append(img)
    return blobs, images


async def verify_acknowledged(c, repo: str, blobs: dict[str, bytes], images: list[Image]) -> None:
    for d, data in blobs.items():
        await assert_blob_intact(c, repo, d, data)
    for i, img in enumerate(images):
        for ref in (f"t{i}", img.digest):
            r = await c.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL})
            assert r.status_code == 200, describe(r)
            assert r.content == img.manifest
        for d, data in img.blobs.items():
            await assert_blob_intact(c, repo, d, data)


@pytest.mark.parametrize("mode", ["chunked-patch", "monolithic-put"])
async def test_kill_during_large_upload(asyncio_node, mode):
    node = asyncio_node
    repo = "faults/kill-upload"
    async with new_client(node) as c:
        blobs, images = await push_acknowledged(c, repo, 4)
        big = random_bytes(48 * MiB, f"kill-{mode}")
        d = digest(big)
        r = await c.post(f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        assert r.status_code == 202, describe(r)
        location = r.headers["Location"]
        if mode == "chunked-patch":
            # one acknowledged chunk first, then the killer chunk
            r = await c.patch(location, content=big[: 8 * MiB],
                              headers={"Content-Range": f"0-{8 * MiB - 1}",
                                       "Content-Type": "application/octet-stream"})
            assert r.status_code == 202, describe(r)
            location = r.headers["Location"]
            start = 8 * MiB
        else:
            start = 0

        sent = 0

        async def body():
            nonlocal sent
            for off in range(start, len(big), MiB):
                if sent >= 12 * MiB:
                    node.kill()  # SIGKILL while the body is streaming
                yield big[off: off + MiB]
                sent += MiB

        if mode == "chunked-patch":
            req = c.patch(location, content=body(),
                          headers={"Content-Range": f"{start}-{len(big) - 1}",
                                   "Content-Length": str(len(big) - start),
                                   "Content-Type": "application/octet-stream"})
        else:
            req = c.put(with_query(location, digest=d), content=body(),
                        headers={"Content-Length": str(len(big)), "Content-Type": "application/octet-stream"})
        with pytest.raises(httpx.TransportError):
            r = await req
            raise AssertionError(f"request finished although the node was killed: {describe(r)}")
        assert not node.alive()

    await restart_after_kill(node)
    async with new_client(node) as c:
        await verify_acknowledged(c, repo, blobs, images)
        await assert_not_visible_or_complete(c, repo, d, big)
        assert_no_bad_file_under_digest(node.data_dir, d)
        # the upload session either is gone or resumes consistently from what it reports
        st = await c.get(location)
        if st.status_code == 204:
            offset = int(st.headers["Range"].split("-")[1]) + 1
            if mode == "chunked-patch":
                assert offset >= 8 * MiB, st.headers["Range"]  # the acknowledged chunk survived
            r = await c.patch(st.headers["Location"], content=big[offset:],
                              headers={"Content-Range": f"{offset}-{len(big) - 1}",
                                       "Content-Type": "application/octet-stream"})
            assert r.status_code == 202, describe(r)
            r = await c.put(with_query(r.headers["Location"], digest=d))
            assert r.status_code == 201, describe(r)
        else:
            assert st.status_code == 404, describe(st)
            assert error_codes(st) == ["BLOB_UPLOAD_UNKNOWN"], describe(st)
            await push_blob(c, repo, big)
        await assert_blob_intact(c, repo, d, big)


async def test_kill_during_streaming_manifest_put(asyncio_node):
    node = asyncio_node
    repo = "faults/kill-manifest"
    async with new_client(node) as c:
        blobs, images = await push_acknowledged(c, repo, 3)
        victim = build_image("kill-manifest-victim", layers=1)
        for data in victim.blobs.values():
            await push_blob(c, repo, data)
        half = len(victim.manifest) // 2

    def kill_while_the_server_waits_for_the_rest() -> None:
        head = request_head("PUT", f"/v2/{repo}/manifests/victim", node.port, len(victim.manifest),
                            victim.media_type)
        with start_body(node.port, head) as s:
            s.sendall(victim.manifest[:half])
            node.kill()
            try:
                reply = s.recv(4096)
            except ConnectionResetError:
                reply = b""
        assert reply == b"", f"the request got an answer although the node was killed: {reply[:200]!r}"
    await anyio.to_thread.run_sync(kill_while_the_server_waits_for_the_rest)

    await restart_after_kill(node)
    async with new_client(node) as c:
        await verify_acknowledged(c, repo, blobs, images)
        for ref in ("victim", victim.digest):
            r = await c.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL})
            assert r.status_code == 404, describe(r)
        r = await c.get(f"/v2/{repo}/tags/list")
        assert r.status_code == 200 and "victim" not in r.json()["tags"], describe(r)
        # and the manifest can be pushed now
        r = await push_manifest(c, repo, "victim", victim.manifest, victim.media_type)
        assert r.status_code == 201, describe(r)


async def test_kill_during_many_manifest_puts(asyncio_node):
    """Kill while manifests are being pushed back to back: afterwards every acknowledged
    manifest is there, and every other one is either complete or absent."""
    node = asyncio_node
    repo = "faults/kill-many"
    images = [build_image(f"many-{i}", layers=1) for i in range(120)]
    acked: set[int] = set()
    async with new_client(node) as c:
        for img in images:  # blobs first, so only manifest PUTs are in flight at the kill
            for data in img.blobs.values():
                await push_blob(c, repo, data)

        async def pusher(indices):
            for i in indices:
                r = await push_manifest(c, repo, f"m{i}", images[i].manifest, images[i].media_type)
                assert r.status_code == 201, describe(r)
                acked.add(i)

        async def killer():
            # polls often: the kill must land while most of the pushes are still to come
            await eventually(lambda: len(acked) >= 15, interval=0.001, what="15 acknowledged pushes")
            await anyio.to_thread.run_sync(node.kill)

        with pytest.raises(BaseException) as info:  # the pushers die with the node
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                for k in range(4):
                    tg.start_soon(pusher, range(k, len(images), 4))
        # the pushers stopped because the node died, not because a push was refused
        assert info.group_contains(httpx.TransportError), info.value
        assert not info.group_contains(AssertionError), info.value
    assert 15 <= len(acked) < len(images), len(acked)

    await restart_after_kill(node)
    async with new_client(node) as c:
        for i, img in enumerate(images):
            r = await c.get(f"/v2/{repo}/manifests/m{i}", headers={"Accept": ACCEPT_ALL})
            if i in acked:
                assert r.status_code == 200, describe(r)
            if r.status_code == 200:
                assert r.content == img.manifest, f"tag m{i} serves other bytes"
                assert r.headers["Docker-Content-Digest"] == img.digest
                g = await c.get(f"/v2/{repo}/manifests/{img.digest}", headers={"Accept": ACCEPT_ALL})
                assert g.status_code == 200 and g.content == img.manifest, describe(g)
                for d, data in img.blobs.items():
                    await assert_blob_intact(c, repo, d, data)
            else:
                assert r.status_code == 404, describe(r)
        r = await c.get(f"/v2/{repo}/tags/list")
        assert r.status_code == 200, describe(r)
        listed = set(r.json()["tags"])
        assert {f"m{i}" for i in acked} <= listed
        for t in listed:  # every listed tag resolves
            g = await c.get(f"/v2/{repo}/manifests/{t}", headers={"Accept": ACCEPT_ALL})
            assert g.status_code == 200, describe(g)


# -- etcd restarts under a running node (local_etcd: conftest.py) ---------------------------------
@pytest.fixture
def two_nodes(local_etcd, tmp_path):
    cluster = f"t-etcd-restart-{uuid.uuid4().hex[:6]}"
    a = NodeProcess(tmp_path / "a", etcd_url=local_etcd.url, cluster=cluster, node_id="a")
    b = NodeProcess(tmp_path / "b", etcd_url=local_etcd.url, cluster=cluster, node_id="b",
                    runtime="trio")
    a.start()
    try:
        b.start()
        try:
            yield a, b
        finally:
            b.kill()
    finally:
        a.kill()


async def push_with_retry(c, repo: str, tag: str, img: Image) -> None:
    """Push through a node that may still be reconnecting to etcd (503 is allowed briefly)."""
    async def attempt():
        for data in img.blobs.values():
            await push_blob(c, repo, data)
        r = await push_manifest(c, repo, tag, img.manifest, img.media_type)
        assert r.status_code == 201, describe(r)
        return True
    await eventually(attempt, interval=0.1, what=f"push {repo}:{tag}")


async def tags_on(c, repo: str) -> list[str]:
    r = await c.get(f"/v2/{repo}/tags/list")
    assert r.status_code == 200, describe(r)
    return r.json()["tags"]


@pytest.mark.parametrize("how", ["restart", "stop-serve-start"])
async def test_etcd_restart_node_recovers_and_misses_no_event(two_nodes, local_etcd, how):
    a, b = two_nodes
    repo = "faults/etcd"
    first = build_image("etcd-first", layers=1)
    async with new_client(a) as ca, new_client(b) as cb:
        await push_image(ca, repo, "t1", first)
        await eventually(lambda: _has_tags(cb, repo, {"t1"}), what="b sees t1 before the restart")

        if how == "restart":
            await anyio.to_thread.run_sync(local_etcd.restart)
        else:
            await anyio.to_thread.run_sync(local_etcd.stop)
            # reads keep working from the node's read model while etcd is away
            r = await ca.get(f"/v2/{repo}/manifests/t1", headers={"Accept": ACCEPT_ALL})
            assert r.status_code == 200 and r.content == first.manifest, describe(r)
            for d, data in first.blobs.items():
                await assert_blob_intact(ca, repo, d, data)
            assert "t1" in await tags_on(ca, repo)
            # etcd stays down until the nodes have felt it: they report that writes would fail
            for client in (ca, cb):
                await eventually(lambda: _unready(client), what="the node to notice that etcd is gone")
            await anyio.to_thread.run_sync(local_etcd.start)

        # a burst of writes through the second node right after etcd is back
        later = [build_image(f"etcd-later-{i}", layers=1) for i in range(5)]
        for i, img in enumerate(later):
            await push_with_retry(cb, repo, f"t{i + 2}", img)
        expected = {"t1"} | {f"t{i + 2}" for i in range(5)}

        # ... all show up on the first node, which was never restarted
        await eventually(lambda: _has_tags(ca, repo, expected),
                         what=f"node a lists {sorted(expected)} after the etcd {how}")
        assert a.alive() and b.alive()
        # and the first node can write again too
        again = build_image("etcd-again", layers=1)
        await push_with_retry(ca, repo, "after", again)
        await eventually(lambda: _has_tags(cb, repo, expected | {"after"}),
                         what="node b sees a's write after the etcd restart")
        r = await ca.get(f"/v2/{repo}/manifests/t1", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 200 and r.content == first.manifest, describe(r)


async def _unready(c) -> bool:
    return (await c.get("/readyz?writable")).status_code == 503


async def _has_tags(c, repo: str, expected: set[str]) -> bool:
    got = set(await tags_on(c, repo))
    assert expected <= got, f"missing {sorted(expected - got)}"
    return True


# -- clusters sharing one etcd --------------------------------------------------------------------
async def test_other_cluster_traffic_does_not_make_a_node_unready(local_etcd, tmp_path):
    """Clusters are isolated by key prefix on one etcd: writes in cluster "beta" must not
    turn a node of cluster "alpha" unready (its /readyz must stay 200)."""
    a = NodeProcess(tmp_path / "alpha", etcd_url=local_etcd.url, cluster="alpha", node_id="a")
    b = NodeProcess(tmp_path / "beta", etcd_url=local_etcd.url, cluster="beta", node_id="b")
    await anyio.to_thread.run_sync(a.start)
    try:
        await anyio.to_thread.run_sync(b.start)
        try:
            async with new_client(a) as ca, new_client(b) as cb:
                for i in range(20):
                    await push_blob(cb, "beta/repo", f"beta blob {i}".encode())
                    # (a node misled by other clusters' revisions answers 503 after its 2 s probe)
                    r = await ca.get("/readyz")
                    assert r.status_code == 200, describe(r)
        finally:
            b.kill()
    finally:
        a.kill()
