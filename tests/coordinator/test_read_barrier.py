"""By-tag reads see every write acknowledged before they began, on any node (issue 13), and
reads arriving together share one etcd round trip, against a real etcd."""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager

import anyio
import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.keys import Keys
from cargohold.coordinator.metadata import ClusterMetadata

pytestmark = pytest.mark.anyio

REPO = "team/app"


@asynccontextmanager
async def reader(etcd):
    """A node's ClusterMetadata following its watch, and a second client that writes behind its back."""
    cluster = f"barrier-{uuid.uuid4().hex[:8]}"
    async with EtcdClient([etcd.url]) as node_client, EtcdClient([etcd.url]) as other_client, \
            anyio.create_task_group() as tg:
        metadata = ClusterMetadata(node_client, cluster, "reader")
        await tg.start(metadata.run)
        yield metadata, other_client, Keys(cluster)
        tg.cancel_scope.cancel()


async def test_a_tag_moved_through_another_node_is_seen_moved_at_once(etcd):
    async with reader(etcd) as (metadata, other, keys):
        for i in range(100):
            moved_to = f"sha256:{i:064x}"
            await other.put(keys.tag(REPO, "latest"), moved_to.encode())   # acknowledged elsewhere
            assert await metadata.resolve_tag(REPO, "latest") == moved_to, i


async def test_reads_arriving_together_share_a_round_trip(etcd):
    async with reader(etcd) as (metadata, other, keys):
        await other.put(keys.tag(REPO, "v1"), f"sha256:{1:064x}".encode())
        before = metadata.read_barrier.round_trips
        answers = []

        async def read():
            answers.append(await metadata.resolve_tag(REPO, "v1"))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(read)
        assert answers == [f"sha256:{1:064x}"] * 50
        # Callers that come while a round trip is under way share the next one.
        assert 1 <= metadata.read_barrier.round_trips - before <= 3


async def test_a_reader_that_goes_away_strands_nobody(etcd):
    async with reader(etcd) as (metadata, other, keys):
        await other.put(keys.tag(REPO, "v2"), f"sha256:{2:064x}".encode())
        async with anyio.create_task_group() as tg:
            tg.start_soon(metadata.resolve_tag, REPO, "v2")
            with anyio.CancelScope() as gone:
                gone.cancel()
                await metadata.resolve_tag(REPO, "v2")
        assert await metadata.resolve_tag(REPO, "v2") == f"sha256:{2:064x}"


async def test_without_consistent_tag_reads_the_model_answers_alone(etcd):
    async with reader(etcd) as (metadata, other, keys):
        metadata.consistent_tag_reads = False
        await other.put(keys.tag(REPO, "v3"), f"sha256:{3:064x}".encode())
        assert await metadata.resolve_tag(REPO, "v3") == f"sha256:{3:064x}"   # a miss still asks etcd
        before = metadata.read_barrier.round_trips
        for _ in range(10):
            await metadata.resolve_tag(REPO, "v3")
        assert metadata.read_barrier.round_trips == before
