"""A blob GET must never commit its headers and then close without the body.

The CI flake of tests/faults/test_read_your_writes_all_paths.py: every artifact push uploads the
same 2-byte config `{}` again through its node, so a node that does not own it holds a copy for
a moment and its placement drops it (record withdrawn, then the file deleted) right after.
A GET on that node that checked the file (`stat`) just before the drop opened it only once the
200 and its Content-Length were sent, found it gone, and closed the connection empty.
"""

from __future__ import annotations

import anyio
import httpx
import pytest

from tests.cluster.conftest import client_for
from tests.support import oci
from tests.support.faultproxy import FaultProxy
from tests.support.node import free_port
from tests.support.placement import blob_owned_by

pytestmark = pytest.mark.anyio

ROUNDS = 300
READERS = 3


async def non_owner(cluster, client_a, client_b, a, b, data: bytes) -> tuple:
    """Upload through both nodes, then wait until one copy is left: the other node is the non-owner."""
    digest = await oci.push_blob(client_a, "drop/one", data)
    await oci.push_blob(client_b, "drop/one", data)
    cluster.wait_until(lambda: len(cluster.holders().get(digest, ())) == 1, what="the non-owner to drop its copy")
    (owner,) = cluster.holders()[digest]
    return (client_b, b) if owner == "a" else (client_a, a)


async def test_a_get_racing_the_drop_of_the_local_copy_still_serves_the_blob(cluster):
    settings = {"replicas_per_site": 1}
    a, b = cluster.add("a", settings=settings), cluster.add("b", settings=settings)
    data = b"{}"
    wrong: list[str] = []
    async with client_for(a) as client_a, client_for(b) as client_b:
        client, node = await non_owner(cluster, client_a, client_b, a, b, data)
        digest = oci.digest(data)
        done = anyio.Event()

        async def read_until_done() -> None:
            while not done.is_set():
                try:
                    r = await client.get(f"/v2/drop/one/blobs/{digest}")
                except httpx.RemoteProtocolError as exc:
                    wrong.append(f"GET through {node.node_id}: {exc!r}")
                    continue
                if r.status_code != 200 or r.content != data:
                    wrong.append(f"GET through {node.node_id}: {r.status_code} {r.content[:200]!r}")

        async with anyio.create_task_group() as tg:
            for _ in range(READERS):
                tg.start_soon(read_until_done)
            for _ in range(ROUNDS):        # each upload gives the non-owner a copy it drops again
                await oci.push_blob(client, "drop/one", data)
                await anyio.sleep(0.01)
            done.set()
    assert wrong == [], f"{len(wrong)} broken answers, first ones:\n" + "\n".join(wrong[:10])
    assert "went between its stat and its open" in node.log_path.read_text(), "the race was never hit"


async def test_a_blob_no_holder_can_deliver_is_a_503_before_any_header(cluster):
    """The only holder advertises a copy it lost: the peer read finds no holder able to serve,
    and the client gets a JSON 503 (retry), not a 200 whose body never comes."""
    settings = {"replicas_per_site": 1}
    a, b = cluster.add("a", settings=settings), cluster.add("b", settings=settings)
    data = b"lost on its only holder"
    async with client_for(a) as client_a, client_for(b) as client_b:
        client, node = await non_owner(cluster, client_a, client_b, a, b, data)
        digest = oci.digest(data)
        owner = b if node is a else a
        (owner.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).unlink()
        r = await client.get(f"/v2/drop/one/blobs/{digest}")
    assert r.status_code == 503, oci.describe(r)
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"


async def test_a_peer_stream_cut_midway_resumes_and_the_client_gets_every_byte(cluster):
    """Node b serves a blob only node a holds; the gRPC link drops after 2 MiB. The read goes on
    from where it stopped (here from a again, the only holder) and the 200 carries every byte."""
    settings = {"replicas_per_site": 1}
    grpc_port = free_port()
    proxy = FaultProxy(grpc_port, cut_after=2 * 1024 * 1024, cut_connections=1)
    try:
        a = cluster.add("a", start=False, settings=settings, args=["--grpc-advertise", proxy.address])
        a.grpc_port = grpc_port
        a.start()
        b = cluster.add("b", settings=settings)
        data = blob_owned_by({"a"}, members=["a", "b"], replicas=1, size=8 * 1024 * 1024, seed="resume")
        async with client_for(a) as client_a, client_for(b) as client_b:
            digest = await oci.push_blob(client_a, "drop/big", data)
            r = await client_b.get(f"/v2/drop/big/blobs/{digest}")
        assert r.status_code == 200 and r.content == data
        assert proxy.cuts_made == 1
        log = b.log_path.read_text()
        assert f"remote read of {digest} from a interrupted at" in log
    finally:
        proxy.close()
