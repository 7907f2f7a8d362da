"""Transfers between nodes survive a link that drops mid-stream, and never record corrupt content."""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.cluster.conftest import client_for
from tests.support import oci
from tests.support.faultproxy import FaultProxy
from tests.support.node import free_port
from tests.support.placement import blob_owned_by

pytestmark = pytest.mark.anyio


async def test_a_dropped_grpc_stream_resumes_from_its_offset_and_is_verified(cluster):
    grpc_port = free_port()
    proxy = FaultProxy(grpc_port, cut_after=2 * 1024 * 1024, cut_connections=1)
    try:
        a = cluster.add("a", start=False, args=["--grpc-advertise", proxy.address])
        a.grpc_port = grpc_port
        a.start()
        data = os.urandom(8 * 1024 * 1024)
        async with client_for(a) as client:
            digest = await oci.push_blob(client, "flaky/app", data)
        b = cluster.add("b")          # with two nodes and two replicas, b must fetch a copy from a
        cluster.wait_until(lambda: "b" in cluster.holders().get(digest, ()), what="b's copy")
        assert proxy.cuts_made >= 1 and proxy.connections >= 2
        log = b.log_path.read_text()
        assert "interrupted at" in log and "resuming" in log
        stored = (b.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == digest[7:]
        async with client_for(b) as client:
            r = await client.get(f"/v2/flaky/app/blobs/{digest}")
            assert r.status_code == 200 and r.content == data
    finally:
        proxy.close()


async def test_a_group_stream_cut_midway_is_finished_one_by_one_and_every_copy_is_intact(cluster):
    """A joining node reads many small blobs from one holder in one ReadBlobs stream. When the
    link drops in the middle, the group ends short (whatever it completed is recorded; how many
    depends on what grpc delivered before the cut), the rest is fetched one by one, and every
    copy is byte-exact."""
    grpc_port = free_port()
    proxy = FaultProxy(grpc_port, cut_after=int(4.5 * 1024 * 1024), cut_connections=1)
    try:
        a = cluster.add("a", start=False, args=["--grpc-advertise", proxy.address])
        a.grpc_port = grpc_port
        a.start()
        blobs = {}
        async with client_for(a) as client:
            for i in range(6):
                data = os.urandom(1024 * 1024 + i)
                blobs[await oci.push_blob(client, "group/app", data)] = data
        b = cluster.add("b")          # two nodes, two replicas: b fetches all six from a
        cluster.wait_until(lambda: all("b" in cluster.holders().get(d, ()) for d in blobs),
                           what="b's copies")
        assert proxy.cuts_made == 1
        log = b.log_path.read_text()
        assert "group transfer from a interrupted" in log
        grouped = [line for line in log.splitlines() if "blobs from a in one stream" in line]
        assert grouped and all("of 6 blobs" in line for line in grouped)
        assert not any("fetched 6 of 6" in line for line in grouped)
        for digest, data in blobs.items():
            stored = (b.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).read_bytes()
            assert stored == data
    finally:
        proxy.close()


async def test_reads_on_a_node_without_a_copy_stream_from_a_holder_through_a_flaky_link(cluster):
    """b holds nothing (replicas 1, a owns the blob); its GET streams from a, resuming after the cut."""
    grpc_port = free_port()
    proxy = FaultProxy(grpc_port, cut_after=0, cut_connections=0)
    try:
        settings = {"replicas_per_site": 1}
        a = cluster.add("a", start=False, settings=settings, args=["--grpc-advertise", proxy.address])
        a.grpc_port = grpc_port
        a.start()
        b = cluster.add("b", settings=settings)
        # replicas 1: a owns this blob alone, so b has no copy and must stream it from a
        data = blob_owned_by({"a"}, members=("a", "b"), replicas=1, size=6 * 1024 * 1024, seed="remote")
        async with client_for(a) as client:
            digest = await oci.push_blob(client, "remote/app", data)
        cluster.wait_until(lambda: cluster.holders().get(digest) == {"a"}, what="a alone to hold it")
        proxy.arm(3 * 1024 * 1024)
        async with client_for(b) as client:
            r = await client.get(f"/v2/remote/app/blobs/{digest}")
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == digest[7:]
        assert proxy.cuts_made == 1
    finally:
        proxy.close()
