"""A GC leader's writes are guarded by its leadership, against a real etcd (issue 13, item 2):
once another node holds the leader key, a stale leader changes nothing, and says so quietly."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid

import anyio
import pytest

from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.gcstate import GcState, LostLeadership
from cargohold.coordinator.keys import Keys
from cargohold.coordinator.metadata import ClusterMetadata, Member
from cargohold.coordinator.records import ManifestRecord
from cargohold.gc.collector import GarbageCollector, new_run
from tests.gc.ageing import PAST_GRACE
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio

HANG_GUARD = 60


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class Gate:
    """A sweep pace that stops the sweep at its `at`-th unit until released: the moment a test
    takes the leadership away."""

    def __init__(self, at: int):
        self.at, self.taken = at, 0
        self.reached, self.release = anyio.Event(), anyio.Event()

    async def take(self, units: int = 1) -> None:
        self.taken += 1
        if self.taken == self.at:
            self.reached.set()
            await self.release.wait()


async def take_over(client: EtcdClient, keys: Keys, node_id: str = "n2") -> int:
    """Another node becomes leader: the old key goes (as with its lease) and a new one comes."""
    await client.delete(keys.gc_leader())
    return await client.put(keys.gc_leader(), node_id.encode())


async def test_every_leader_write_fails_once_another_node_leads(etcd):
    cluster = f"gcl-{uuid.uuid4().hex[:8]}"
    keys = Keys(cluster)
    async with EtcdClient([etcd.url]) as client:
        metadata = ClusterMetadata(client, cluster, "n1")
        state = GcState(metadata)
        async with anyio.create_task_group() as tg:
            await tg.start(metadata.run)
            layer = digest("layer")
            await metadata.record_blob("team/app", layer, 10)
            manifest = ManifestRecord("application/vnd.oci.image.manifest.v1+json", 200, (layer,), (), None, None,
                                      time.time())
            await metadata.record_blob("team/app", digest("m"), 200)
            await metadata.put_manifest("team/app", digest("m"), manifest, "v1")
            snapshot = await state.read_snapshot()
            (_, manifest_revision), = [v for (_, d), v in snapshot.manifests.items() if d == digest("m")]
            _, layer_revision = snapshot.blobs[layer]

            lease = await client.grant_lease(30)
            leadership = await state.campaign(lease)
            assert leadership is not None
            assert await state.campaign(lease) is None                             # already held
            run = new_run(dry_run=False)
            await state.put_run(run, leadership)                                   # while it leads: written

            await take_over(client, keys)
            before = await client.current_revision()
            with pytest.raises(LostLeadership):
                await state.put_run({**run, "state": "failed"}, leadership)
            with pytest.raises(LostLeadership):
                await state.tombstone_blobs([(layer, layer_revision, 10)], run["id"], leadership)
            with pytest.raises(LostLeadership):
                await state.tombstone_blob((layer, layer_revision, 10), run["id"], leadership)
            with pytest.raises(LostLeadership):
                await state.sweep_manifest("team/app", digest("m"), manifest_revision, leadership)
            with pytest.raises(LostLeadership):
                await state.delete_tag("team/app", "v1", digest("m"), leadership)
            assert await state.clear_tombstones({layer: run["id"]}, leadership) == 0
            assert await client.current_revision() == before                       # nothing written
            tg.cancel_scope.cancel()


async def test_a_collector_that_loses_leadership_mid_sweep_writes_nothing_more(etcd, caplog):
    caplog.set_level(logging.INFO, logger="cargohold")
    cluster = f"gcl-{uuid.uuid4().hex[:8]}"
    keys = Keys(cluster)
    async with EtcdClient([etcd.url]) as client:
        metadata = ClusterMetadata(client, cluster, "n1")
        gate = Gate(at=5)
        # The clock puts the collector two hours ahead: every blob below is past the grace period.
        collector = GarbageCollector(metadata, workers=1, batch=1, pace=gate,
                                     clock=lambda: time.time() + PAST_GRACE)
        async with anyio.create_task_group() as tg:
            await tg.start(metadata.run)
            tg.start_soon(metadata.keep_membership, Member("n1", "default", "http://n1", "n1:1", "active"))
            for i in range(40):
                await metadata.record_blob("dead/app", digest(f"dead{i}"), 64)
            tg.start_soon(collector.run)
            run = new_run(dry_run=False)
            await metadata.request_gc_run(run)
            with anyio.fail_after(HANG_GUARD):
                await gate.reached.wait()
            await take_over(client, keys)
            before = await client.current_revision()
            record_before = await client.get(keys.gc_run(run["id"]))
            gate.release.set()
            await eventually(lambda: any("no longer leads garbage collection" in r.getMessage()
                                         for r in caplog.records), what="the collector to step down")
            assert await client.current_revision() == before                       # no write after the takeover
            tombstones, _, _ = await client.get_prefix(keys.tombstones_prefix())
            tg.cancel_scope.cancel()

    assert record_before is not None and b'"state":"running"' in record_before.value
    assert b'"candidates":40' in record_before.value          # the injected clock made them all dead
    assert len(tombstones) == 4                                # swept before the gate, none after
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("the run is left to the current leader" in r.getMessage() for r in caplog.records)
