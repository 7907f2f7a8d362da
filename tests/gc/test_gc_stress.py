"""A bounded stress run: pushes, re-pushes, tag deletes and pulls on three nodes while garbage
collections run back to back (DESIGN.md invariant 1, issue 5's race requirements)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import anyio
import pytest

from cargohold.coordinator.etcd import EtcdClient
from tests.cluster.conftest import client_for
from tests.gc.ageing import age
from tests.support import oci
from tests.support.poll import until

pytestmark = pytest.mark.anyio

DURATION = 15.0
PUSHERS = 4
MIN_PUSHES = 20
MIN_RUNS = 2


async def docker_like_push(client, repo: str, tag: str, image: oci.Image, violations: list) -> bool:
    """HEAD each blob, upload only what HEAD says is missing, then PUT the manifest (as docker does).
    A MANIFEST_BLOB_UNKNOWN for a blob that HEAD answered 200 is a violation; otherwise the
    client uploads the missing blobs and tries again."""
    for attempt in range(5):
        seen = set()
        for digest, data in image.blobs.items():
            r = await client.head(f"/v2/{repo}/blobs/{digest}")
            if r.status_code == 200:
                seen.add(digest)
            else:
                await oci.push_blob(client, repo, data)
        r = await oci.push_manifest(client, repo, tag, image.manifest, image.media_type)
        if r.status_code == 201:
            return True
        assert r.status_code == 400 and oci.error_codes(r) == ["MANIFEST_BLOB_UNKNOWN"], oci.describe(r)
        missing = set(r.json()["errors"][0]["detail"]["blobs"])
        if missing & seen:
            violations.append((repo, tag, sorted(missing & seen)))
    return False


async def test_pushes_pulls_and_deletes_during_back_to_back_collections(cluster):
    settings = {"gc_grace": "1s"}
    nodes = [cluster.add(n, settings=settings) for n in ("a", "b", "c")]
    rng = random.Random(7)
    layers = [oci.random_layer(f"shared-{i}", file_size=3000) for i in range(6)]
    tagged: dict[tuple[str, str], oci.Image] = {}
    violations: list = []
    counts = {"pushes": 0, "deletes": 0, "pulls": 0, "runs": 0}
    deadline = time.monotonic() + DURATION

    def going_on(count: str, at_least: int) -> bool:
        # At least DURATION seconds, and (on a slow machine, longer) at least so much work.
        return time.monotonic() < deadline or counts[count] < at_least

    def image_for(seed: str) -> oci.Image:
        chosen = rng.sample(layers, 2)
        config = oci.image_config(chosen, seed=seed)
        return oci.Image(oci.oci_manifest(config, chosen), oci.OCI_MANIFEST,
                         {oci.digest(b): b for b in [config, *chosen]})

    async def pusher(k: int) -> None:
        i = 0
        while going_on("pushes", MIN_PUSHES):
            node = nodes[(k + i) % 3]
            repo, tag = f"stress/app{k % 2}", f"t{k}-{i % 5}"
            async with client_for(node) as client:
                action = rng.random()
                if action < 0.6:
                    image = image_for(f"{k}-{i}")
                    if await docker_like_push(client, repo, tag, image, violations):
                        tagged[(repo, tag)] = image
                        counts["pushes"] += 1
                elif action < 0.8 and (repo, tag) in tagged:
                    r = await client.delete(f"/v2/{repo}/manifests/{tag}")
                    assert r.status_code in (202, 404)
                    tagged.pop((repo, tag), None)
                    counts["deletes"] += 1
                elif (repo, tag) in tagged:
                    image = tagged[(repo, tag)]
                    r = await client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": oci.OCI_MANIFEST})
                    if r.status_code == 200 and (repo, tag) in tagged and tagged[(repo, tag)] is image:
                        assert r.content == image.manifest
                        for digest, data in image.blobs.items():
                            rb = await client.get(f"/v2/{repo}/blobs/{digest}")
                            assert rb.status_code == 200 and rb.content == data, (digest, rb.status_code)
                        counts["pulls"] += 1
            i += 1

    async def collector() -> None:
        while going_on("runs", MIN_RUNS):
            result = await anyio.to_thread.run_sync(lambda: cluster.cli("gc", "run", "--wait", "--json"))
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["state"] == "done"
            counts["runs"] += 1

    async with anyio.create_task_group() as tg:
        for k in range(PUSHERS):
            tg.start_soon(pusher, k)
        tg.start_soon(collector)

    assert violations == [], violations
    assert counts["runs"] >= MIN_RUNS and counts["pushes"] >= MIN_PUSHES, counts

    # Every tagged image pulls intact from every node.
    for node in nodes:
        async with client_for(node) as client:
            for (repo, tag), image in tagged.items():
                r = await client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": oci.OCI_MANIFEST})
                assert r.status_code == 200 and r.content == image.manifest, (node.node_id, repo, tag)
                for digest, data in image.blobs.items():
                    rb = await client.get(f"/v2/{repo}/blobs/{digest}")
                    assert rb.status_code == 200 and rb.content == data

    # Past the grace period and after two runs, nothing unreferenced is left in etcd or on any disk.
    await age(cluster, seconds=60)
    for _ in range(2):
        assert json.loads(cluster.cli("gc", "run", "--wait", "--json").stdout)["state"] == "done"
    # The manifests that exist (tagged or untagged) and what they reference are all that may remain.
    prefix = f"/cargohold/{cluster.name}/"
    async with EtcdClient([cluster.etcd_url]) as etcd:
        manifests, _, _ = await etcd.get_prefix(prefix + "manifests/")
        referenced = set()
        for kv in manifests:
            record = json.loads(kv.value)
            referenced.add(kv.key.rpartition("/")[2])
            referenced.update(record.get("blobs", []))
        blob_keys, _, _ = await etcd.get_prefix(prefix + "blobs/", keys_only=True)
    recorded = {kv.key[len(prefix + "blobs/"):] for kv in blob_keys if "/" not in kv.key[len(prefix + "blobs/"):]}
    assert recorded == referenced

    def disks_clean():
        holders = cluster.holders()
        for node in nodes:
            on_disk = {f"sha256:{p.name}" for p in Path(node.data_dir, "blobs", "sha256").glob("*/*")}
            held = {d for d, h in holders.items() if node.node_id in h}
            if on_disk != held:
                return False
        return set(holders) == referenced
    until(disks_clean, what="every disk to hold exactly what etcd says")
    print(counts)
