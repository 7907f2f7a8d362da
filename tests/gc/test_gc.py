"""Online garbage collection with real nodes: what is swept, what survives, and races."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import anyio
import pytest
import yaml

from cargohold.coordinator.etcd import EtcdClient
from tests.cluster.conftest import client_for
from tests.gc.ageing import PAST_GRACE, age
from tests.support import oci
from tests.support.poll import eventually, until

pytestmark = pytest.mark.anyio


def gc(cluster, *extra: str) -> dict:
    result = cluster.cli("gc", "run", "--wait", "--json", *extra, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def on_disk(node, digest: str) -> bool:
    return (Path(node.data_dir) / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()


async def pull_ok(node, repo: str, tag: str, image: oci.Image) -> None:
    async with client_for(node) as c:
        r = await c.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": image.media_type})
        assert r.status_code == 200 and r.content == image.manifest, oci.describe(r)
        for digest, data in image.all_blobs().items():
            r = await c.get(f"/v2/{repo}/blobs/{digest}")
            assert r.status_code == 200 and r.content == data, f"{node.node_id} {digest}: {r.status_code}"


async def test_sweeps_unreferenced_blobs_everywhere_and_keeps_live_ones(cluster):
    nodes = [cluster.add(n) for n in ("a", "b", "c")]
    image = oci.build_image("live", layers=2)
    orphans = [oci.random_bytes(5000, seed=f"orphan{i}") for i in range(5)]
    async with client_for(nodes[0]) as client:
        await oci.push_image(client, "gc/app", "v1", image)
        orphan_digests = [await oci.push_blob(client, "gc/app", data) for data in orphans]
    holders = until(lambda: (h := cluster.holders()) and all(len(h.get(d, ())) == 2 for d in orphan_digests) and h,
                    what="placement")
    copies = sum(len(holders[d]) for d in orphan_digests)
    await age(cluster)                                # older than the grace period
    dry = gc(cluster, "--dry-run")
    assert dry["state"] == "done" and dry["would_free"]["blobs"] == 5 and dry["swept"] == 0
    assert all(any(on_disk(n, d) for n in nodes) for d in orphan_digests)
    run = gc(cluster)
    # Every copy was on a live node: all are freed, and no tombstone is left when the run ends.
    assert run["swept"] == 5 and run["bytes_freed"] == copies * 5000 and run["tombstones_left"] == 0, run
    until(lambda: not any(on_disk(n, d) for n in nodes for d in orphan_digests),
          what="every node to delete its copies")
    holders = cluster.holders()
    assert not set(orphan_digests) & set(holders)
    for node in nodes:
        await pull_ok(node, "gc/app", "v1", image)
        async with client_for(node) as c:
            r = await c.head(f"/v2/gc/app/blobs/{orphan_digests[0]}")
            assert r.status_code == 404
    status = json.loads(cluster.cli("gc", "status", "--json").stdout)
    assert status["latest"]["id"] == run["id"] and status["leader"] in {"a", "b", "c"}
    assert status["latest"]["tombstones_left"] == 0


async def test_a_run_reports_copies_on_a_down_node_as_left_not_freed(cluster):
    """`bytes_freed` counts the copies actually deleted and `tombstones_left` what still waits:
    a node that is down keeps its copies (and their tombstones) until it is back."""
    a, b = cluster.add("a"), cluster.add("b")
    async with client_for(a) as client:
        orphans = [await oci.push_blob(client, "down/app", oci.random_bytes(3000, seed=f"down{i}"))
                   for i in range(3)]
    until(lambda: all(cluster.holders().get(d) == {"a", "b"} for d in orphans), what="a copy on each node")
    b.stop()
    await age(cluster)
    run = gc(cluster)
    assert run["swept"] == 3 and run["bytes_freed"] == 3 * 3000 and run["tombstones_left"] == 3, run
    assert all(on_disk(b, d) for d in orphans)
    b.start()                                          # back: it releases what was condemned
    until(lambda: not any(on_disk(b, d) for d in orphans), what="the returning node to delete its copies")
    until(lambda: not set(orphans) & set(cluster.holders()), what="no copy record left")


async def test_head_refreshes_the_hold_and_a_reupload_resurrects(cluster):
    a = cluster.add("a")
    data = oci.random_bytes(4000, seed="held")
    async with client_for(a) as client:
        digest = await oci.push_blob(client, "hold/app", data)
        await age(cluster)
        assert (await client.head(f"/v2/hold/app/blobs/{digest}")).status_code == 200
        assert gc(cluster)["swept"] == 0                      # the HEAD renewed its hold
        await age(cluster)
        assert gc(cluster)["swept"] == 1                      # nothing touched it since
        assert (await client.head(f"/v2/hold/app/blobs/{digest}")).status_code == 404
        assert await oci.push_blob(client, "hold/app", data) == digest   # re-upload after the sweep
        r = await client.get(f"/v2/hold/app/blobs/{digest}")
        assert r.status_code == 200 and r.content == data
    assert "a" in cluster.holders()[digest]


async def test_untagged_manifests_go_after_untagged_after(cluster):
    a = cluster.add("a", settings={"untagged_after": "1h"})
    keep, drop = oci.build_image("keep", layers=1), oci.build_image("drop", layers=1)
    async with client_for(a) as client:
        await oci.push_image(client, "ut/app", "keep", keep)
        await oci.push_image(client, "ut/app", "drop", drop)
        assert (await client.delete("/v2/ut/app/manifests/drop")).status_code == 202   # untag
        await age(cluster)
        run = gc(cluster)
        assert run["manifests_deleted"] == 1 and run["swept"] >= 3      # manifest bytes, config, layer
        r = await client.get(f"/v2/ut/app/manifests/{drop.digest}", headers={"Accept": drop.media_type})
        assert r.status_code == 404
    await pull_ok(a, "ut/app", "keep", keep)


async def test_retention_rules_and_immutable_tags(cluster, tmp_path):
    a = cluster.add("a")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({
        "retention": [{"repositories": "ret/*", "keep_last": 2, "keep_tags": "^release-"}],
        "immutable": [{"repositories": "ret/*", "tags": "v*"}]}))
    assert cluster.cli("retention", "rules", "set", str(rules)).returncode == 0
    listed = cluster.cli("retention", "rules", "list").stdout
    assert "keep_last=2" in listed and "immutable tag rule" in listed
    images = {}
    async with client_for(a) as client:
        for i, tag in enumerate(["old1", "old2", "release-1", "new1", "new2", "v1"]):
            images[tag] = oci.build_image(f"ret-{tag}", layers=1)
            await oci.push_image(client, "ret/app", tag, images[tag])
            time.sleep(0.05)
        other = oci.build_image("ret-other", layers=1)
        r = await oci.push_manifest(client, "ret/app", "v1", other.manifest, other.media_type)
        assert r.status_code == 400 or r.status_code == 403
        for blob in other.blobs.values():
            await oci.push_blob(client, "ret/app", blob)
        r = await oci.push_manifest(client, "ret/app", "v1", other.manifest, other.media_type)
        assert r.status_code == 403 and oci.error_codes(r) == ["DENIED"]
        assert "immutable tag rule" in r.json()["errors"][0]["message"]
        r = await oci.push_manifest(client, "ret/app", "v1", images["v1"].manifest, images["v1"].media_type)
        assert r.status_code == 201                                           # same content: allowed
        assert (await client.delete("/v2/ret/app/manifests/v1")).status_code == 403
        assert (await client.delete(f"/v2/ret/app/manifests/{images['v1'].digest}")).status_code == 403
    dry = gc(cluster, "--dry-run")
    planned = {item["tag"] for item in dry["retention"]}
    assert planned == {"old1", "old2"}                 # v1 immutable, release-* kept, 2 newest kept
    run = gc(cluster)
    assert run["tags_deleted"] == 2
    async with client_for(a) as client:
        tags = (await client.get("/v2/ret/app/tags/list")).json()["tags"]
    assert tags == ["new1", "new2", "release-1", "v1"]


async def test_a_collection_gives_way_to_clients(cluster):
    """While the node serves registry requests, sweeping and releasing go at `gc_busy_rate`
    dead blobs per second (tests/unit/test_pacing.py shows the idle case going unpaced)."""
    node = cluster.add("a", settings={"gc_busy_rate": 20})

    async def orphans(tag: str) -> None:
        async with client_for(node) as client:
            for i in range(40):
                await oci.push_blob(client, "pace/app", oci.random_bytes(100, seed=f"{tag}{i}"))
        await age(cluster)                              # past the grace period

    await orphans("idle")
    idle = gc(cluster)
    await orphans("busy")
    async with anyio.create_task_group() as tg:
        async def client_traffic() -> None:
            async with client_for(node) as client:
                while True:
                    await client.get("/v2/")
                    await anyio.sleep(0.05)
        tg.start_soon(client_traffic)
        busy = await anyio.to_thread.run_sync(gc, cluster)
        tg.cancel_scope.cancel()
    assert idle["swept"] == busy["swept"] == 40
    assert busy["duration"] >= 1.5, busy             # 40 blobs at 20/s, less a 0.25 s burst


SLOW_SWEEP = {"gc_workers": 1, "gc_batch": 1}     # one blob per transaction: a sweep of seconds


async def many_dead_blobs(cluster, nodes, count: int = 1500) -> oci.Image:
    """One live image and `count` unreferenced blobs, all past the grace period."""
    live = oci.build_image("survivor", layers=2)
    async with client_for(nodes["a"]) as client:
        await oci.push_image(client, "kl/app", "v1", live)

    async def push_many(offset):
        async with client_for(nodes["a"]) as c:
            for i in range(offset, count, 8):
                await oci.push_blob(c, "kl/app", oci.random_bytes(64, seed=f"dead{i}"))
    async with anyio.create_task_group() as tg:
        for k in range(8):
            tg.start_soon(push_many, k)
    await age(cluster)
    return live


class RunWatcher:
    """The run record and the leader key, read from etcd (the test's own client)."""

    def __init__(self, cluster, etcd: EtcdClient):
        self.prefix = f"/cargohold/{cluster.name}/gc/"
        self.etcd = etcd

    async def run(self, run_id: str) -> dict:
        kv = await self.etcd.get(self.prefix + f"runs/{run_id}")
        return json.loads(kv.value) if kv else {}

    async def record(self, run_id: str):
        return await self.etcd.get(self.prefix + f"runs/{run_id}")

    async def leader(self) -> str | None:
        kv = await self.etcd.get(self.prefix + "leader")
        return kv.value.decode() if kv else None

    async def sweeping(self, run_id: str) -> dict:
        """Once the run has swept something (the sweep is quick: look often)."""
        async def swept():
            run = await self.run(run_id)
            return run.get("phase") == "sweep" and run.get("swept", 0) > 0 and run
        return await eventually(swept, interval=0.02, what="the sweep to start")

    async def done(self, run_id: str) -> dict:
        async def finished():
            run = await self.run(run_id)
            return run.get("state") == "done" and run
        # Up to 1500 one-blob transactions after a lease expiry (the whole test takes ~34 s
        # alone). Each is an etcd fsync, and on a loaded machine those slow down many times over
        # (a run with two suites at once took over 120 s). A run that never finishes still fails.
        return await eventually(finished, timeout=300, interval=0.2, what="the run to finish")


async def test_leader_killed_mid_sweep_another_node_finishes(cluster):
    nodes = {n: cluster.add(n, settings=SLOW_SWEEP) for n in ("a", "b", "c")}
    live = await many_dead_blobs(cluster, nodes)
    requested = json.loads(cluster.cli("gc", "run", "--json").stdout)["run"]
    async with EtcdClient([cluster.etcd_url]) as etcd:
        watcher = RunWatcher(cluster, etcd)
        swept_before = (await watcher.sweeping(requested))["swept"]
        leader = await watcher.leader()
        nodes[leader].kill()
        run = await watcher.done(requested)
    assert run["leaders"][0] == leader and run["leaders"][-1] != leader
    assert run["swept"] >= swept_before and run["candidates"] >= 1
    survivors = [n for name, n in nodes.items() if name != leader]
    for node in survivors:
        await pull_ok(node, "kl/app", "v1", live)


async def test_a_leader_frozen_mid_sweep_leaves_the_finished_run_alone(cluster):
    """Issue 13: a leader stopped (SIGSTOP) mid-sweep loses its lease; another node resumes
    and finishes the run. When the first one runs again, its writes fail their leadership
    guard: the finished record keeps its state and figures, and the first node logs no ERROR."""
    nodes = {n: cluster.add(n, settings=SLOW_SWEEP) for n in ("a", "b", "c")}
    live = await many_dead_blobs(cluster, nodes)
    requested = json.loads(cluster.cli("gc", "run", "--json").stdout)["run"]
    async with EtcdClient([cluster.etcd_url]) as etcd:
        watcher = RunWatcher(cluster, etcd)
        await watcher.sweeping(requested)
        frozen = nodes[await watcher.leader()]
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            finished = await watcher.done(requested)
            record = await watcher.record(requested)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        assert finished["leaders"][0] == frozen.node_id and finished["leaders"][-1] != frozen.node_id
        # The thawed node notices, quietly, that it leads no more ...
        await eventually(lambda: "no longer leads garbage collection" in frozen.log_path.read_text(),
                         what="the thawed node to give up leading")
        # ... and by then any write it still tried has failed its guard.
        assert (await watcher.record(requested)).mod_revision == record.mod_revision
    log = frozen.log_path.read_text()
    assert " ERROR " not in log and "Traceback" not in log, frozen.log_tail()
    assert "this node no longer leads; the run is left to the current leader" in log, frozen.log_tail()
    assert finished["state"] == "done" and finished["swept"] > 0
    for node in nodes.values():
        await pull_ok(node, "kl/app", "v1", live)


async def test_scheduled_runs_and_the_scrub_of_orphan_files(cluster):
    a = cluster.add("a", settings={"gc_interval": "2s"}, start=False)
    # A file no etcd record accounts for (as a crash between write and publish would leave),
    # older than the grace period. It is there before the node starts: a node scrubs at most
    # once per grace period, and its first scheduled run comes at once.
    orphan = oci.random_bytes(1000, seed="orphan-file")
    digest = oci.digest(orphan)
    path = Path(a.data_dir) / "blobs" / "sha256" / digest[7:9] / digest[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orphan)
    old = time.time() - PAST_GRACE
    os.utime(path, (old, old))
    a.start()
    async with client_for(a) as client:
        young = oci.random_bytes(1000, seed="young-file")   # on disk and in etcd: never scrubbed
        young_digest = await oci.push_blob(client, "scrub/app", young)

    def scheduled_run_done():
        status = json.loads(cluster.cli("gc", "status", "--json").stdout)
        run = status["latest"]
        return run is not None and run["reason"] == "scheduled" and run["state"] == "done" and run
    until(scheduled_run_done, what="a scheduled run")
    until(lambda: not path.exists(), what="the scrub to remove the orphan")
    assert "scrub: removed" in a.log_path.read_text()
    assert on_disk(a, young_digest) and young_digest in cluster.holders()
