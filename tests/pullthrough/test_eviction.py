"""Last-pulled times in batches, eviction of unused cached images, and `repo remove` releasing
the cache: real etcd, real node processes, real GC runs.

A cached image is what the pull-through engine leaves behind: an ordinary repository under the
remote repository's namespace (`hub/library/old`) whose blobs are linked into it and whose
manifest is recorded and tagged. The tests make one the same way, through `ClusterMetadata`,
from an image pushed to a local repository of a running node (whose copies of the bytes it
then names), so they do not depend on an upstream being reachable.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import anyio
import pytest

from cargohold.coordinator.cacheusage import MAX_OPS, CacheUsage, _batches
from cargohold.coordinator.etcd import EtcdClient
from cargohold.coordinator.keys import Keys
from cargohold.coordinator.metadata import ClusterMetadata
from cargohold.coordinator.records import ManifestRecord
from cargohold.pullthrough.usage import PullRecorder, unused_images
from tests.cluster.conftest import client_for, cluster  # noqa: F401  (the multi-node fixture)
from tests.support import oci
from tests.support.node import free_port
from tests.support.poll import eventually, until

pytestmark = pytest.mark.anyio

HOUR = 3600.0


# ---------------------------------------------------------------------- pure decisions
def test_unused_images_by_last_pull_or_creation():
    now = 1_000_000.0
    images = {"hub/a": now - 10 * HOUR, "hub/b": now - 10 * HOUR, "hub/c": now - 60, "hub/d": now - 10 * HOUR}
    pulled = {"hub/a": now - 5 * HOUR, "hub/b": now - 30, "hub/c": now - 10 * HOUR}
    # a: pulled long ago; b: pulled recently; c: never pulled since a fresh fill; d: never pulled
    assert unused_images(images, pulled, now, HOUR) == [("hub/a", now - 5 * HOUR), ("hub/d", now - 10 * HOUR)]
    assert unused_images(images, pulled, now, 20 * HOUR) == []


def test_release_batches_never_split_a_manifest():
    groups = [["m"] * 50, ["m"] * 50, ["m"] * 50, ["big"] * (MAX_OPS + 5), ["t"]]
    batches = _batches(groups)
    assert [(len(ops), count) for ops, count in batches] == [(100, 2), (50, 1), (MAX_OPS + 5, 1), (1, 1)]
    assert _batches([]) == []


# ---------------------------------------------------------------------- helpers
def cluster_name(tag: str) -> str:
    return f"pt-{tag}-{uuid.uuid4().hex[:8]}"


def unreachable_upstream() -> str:
    """An upstream on a loopback port nobody listens on: nothing leaves the machine."""
    return f"http://127.0.0.1:{free_port()}"


async def cache_image(etcd_url: str, cluster: str, node_id: str, source: str, local_name: str,
                      image: oci.Image, *, created: float, tag: str | None = "v1") -> None:
    """Record `image` (pushed to local repository `source` on node `node_id`) as cached under
    `local_name`, as the pull-through engine would: blobs linked, an index's children recorded
    first, the manifest recorded and tagged."""
    async with EtcdClient([etcd_url]) as client:
        metadata = ClusterMetadata(client, cluster, node_id)
        await _record(metadata, source, local_name, image, created, tag)


async def _record(metadata: ClusterMetadata, source: str, local_name: str, image: oci.Image,
                  created: float, tag: str | None) -> None:
    for child in image.children:
        await _record(metadata, source, local_name, child, created, None)
    for digest in image.blobs:
        assert await metadata.link_blob(local_name, source, digest) is not None
    document = image.json
    blobs = [document["config"], *document["layers"]] if "layers" in document else []
    record = ManifestRecord(image.media_type, image.size, tuple(d["digest"] for d in blobs),
                            tuple(c.digest for c in image.children), None, None, created)
    await metadata.put_manifest(local_name, image.digest, record, tag)


async def keys_under(etcd_url: str, cluster: str, *sections: str) -> list[str]:
    prefix = Keys(cluster).prefix
    found = []
    async with EtcdClient([etcd_url]) as client:
        for section in sections:
            kvs, _, _ = await client.get_prefix(prefix + section, keys_only=True)
            found += [kv.key[len(prefix):] for kv in kvs]
    return found


async def push_source(node, repo: str, image: oci.Image) -> None:
    """Push an image to a local repository of `node`, from which `cache_image` records it."""
    async with client_for(node) as client:
        await oci.push_image(client, repo, "v1", image)


async def delete_manifest(node, repo: str, image: oci.Image) -> None:
    """Delete the source's manifest: afterwards only the cached copy keeps the blobs alive."""
    async with client_for(node) as client:
        r = await client.delete(f"/v2/{repo}/manifests/{image.digest}")
        assert r.status_code == 202, oci.describe(r)


def on_disk(node, digest: str) -> bool:
    return (Path(node.data_dir) / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()


def layers_of(image: oci.Image) -> list[str]:
    return list(image.blobs)


# ---------------------------------------------------------------------- batched last-pulled times
async def test_pulls_are_written_in_one_transaction_per_flush(etcd):
    name = cluster_name("batch")
    async with EtcdClient([etcd.url]) as client:
        metadata = ClusterMetadata(client, name, "n1")
        recorder = PullRecorder(metadata, interval=0.3)
        for i in range(300):                                   # 300 pulls of 3 images
            recorder.note(f"hub/library/image{i % 3}")
        before = await client.current_revision()
        assert await recorder.flush() == 3
        assert await client.current_revision() == before + 1    # one transaction: one revision
        assert recorder.writes == 1 and await recorder.flush() == 0
        pulled = await CacheUsage(metadata).last_pulls("hub")
        assert set(pulled) == {f"hub/library/image{i}" for i in range(3)}
        assert all(time.time() - t < 60 for t in pulled.values())

        # The background task: many pulls over several intervals, at most one write per interval,
        # and what is noted before a stop is still written.
        start = await client.current_revision()
        async with anyio.create_task_group() as tg:
            await tg.start(recorder.run)
            for i in range(200):
                recorder.note(f"hub/library/image{i % 7}")
                await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
        writes = await client.current_revision() - start
        assert 1 <= writes <= 6 and recorder.writes == 1 + writes, writes
        assert len(await CacheUsage(metadata).last_pulls("hub")) == 7


# ---------------------------------------------------------------------- eviction and GC
async def test_an_unused_cached_image_is_released_and_gc_frees_it_a_pulled_one_stays(cluster):  # noqa: F811
    audit_log = cluster.root / "audit.log"
    node = cluster.add("a", settings={"eviction_interval": 0.5, "gc_grace": "1s", "audit_log": str(audit_log)})
    old, recent = oci.build_image("evict-old", layers=2), oci.build_image("evict-recent", layers=2)
    await push_source(node, "src/old", old)
    await push_source(node, "src/recent", recent)
    added = cluster.cli("repo", "add", "hub", "--remote", unreachable_upstream(), "--evict-unused-after", "60s")
    assert added.returncode == 0, added.stderr
    # A node notes a pull of `recent` before it is cached: the node's eviction pass runs every
    # 0.5 s and would rightly release an image recorded 2 h ago with no pull yet.
    async with EtcdClient([cluster.etcd_url]) as client:
        recorder = PullRecorder(ClusterMetadata(client, cluster.name, "b"))
        recorder.note("hub/library/recent")
        await recorder.flush()
    long_ago = time.time() - 2 * HOUR
    await cache_image(cluster.etcd_url, cluster.name, "a", "src/old", "hub/library/old", old, created=long_ago)
    await cache_image(cluster.etcd_url, cluster.name, "a", "src/recent", "hub/library/recent", recent,
                      created=long_ago)
    for repo, image in (("src/old", old), ("src/recent", recent)):
        await delete_manifest(node, repo, image)

    async def released() -> bool:
        return not await keys_under(cluster.etcd_url, cluster.name, "tags/hub/library/old/",
                                    "manifests/hub/library/old/")
    await eventually(released, what="the unused image to be released")
    kept = await keys_under(cluster.etcd_url, cluster.name, "tags/hub/library/recent/",
                            "manifests/hub/library/recent/")
    assert kept == ["tags/hub/library/recent/v1", f"manifests/hub/library/recent/{recent.digest}"]
    left = await keys_under(cluster.etcd_url, cluster.name, f"refs/{layers_of(old)[0]}/",
                            "cache/pulled/hub/library/old", "repos/hub/library/old")
    assert left == []
    assert "evicted hub/library/old" in node.log_tail(200)
    events = [json.loads(line) for line in audit_log.read_text().splitlines()]
    evicted = [e for e in events if e["event"] == "evict"]
    assert [(e["repository"], e["remote"], e["complete"]) for e in evicted] == [("hub/library/old", "hub", True)]

    await anyio.sleep(1.2)                                     # past the 1 s grace of the blobs
    run = gc_run(cluster)
    assert run["swept"] >= 3, run                              # old's config, layers and manifest
    until(lambda: not any(on_disk(node, d) for d in [*layers_of(old), old.digest]), what="old's blobs deleted")
    assert all(on_disk(node, d) for d in [*layers_of(recent), recent.digest])


async def test_repo_remove_releases_the_cache_unless_kept(cluster):  # noqa: F811
    node = cluster.add("a")
    image = oci.build_image("remove-me", layers=1)
    multi = oci.build_index("remove-me-too")                 # an index and its two children
    await push_source(node, "src/app", image)
    await push_source(node, "src/multi", multi)
    for name in ("gone", "kept"):
        assert cluster.cli("repo", "add", name, "--remote", unreachable_upstream()).returncode == 0
        await cache_image(cluster.etcd_url, cluster.name, "a", "src/app", f"{name}/team/app", image,
                          created=time.time())
        await cache_image(cluster.etcd_url, cluster.name, "a", "src/multi", f"{name}/team/app/nested", multi,
                          created=time.time(), tag="v2")

    removed = cluster.cli("repo", "remove", "gone", "--json")
    assert removed.returncode == 0, removed.stderr
    report = {r["repository"]: r for r in json.loads(removed.stdout)["released"]}
    assert report == {"gone/team/app": {"repository": "gone/team/app", "tags": 1, "manifests": 1, "complete": True},
                      "gone/team/app/nested": {"repository": "gone/team/app/nested", "tags": 1, "manifests": 3,
                                               "complete": True}}
    child = multi.children[0]
    assert await keys_under(cluster.etcd_url, cluster.name, "tags/gone/", "manifests/gone/", "repos/gone",
                            f"refs/{image.digest}/gone/", f"refs/{layers_of(image)[0]}/gone/",
                            f"refs/{child.digest}/gone/", f"refs/{layers_of(child)[0]}/gone/") == []

    kept = cluster.cli("repo", "remove", "kept", "--keep-cache")
    assert kept.returncode == 0 and "stay as ordinary repositories" in kept.stdout, kept.stderr
    assert len(await keys_under(cluster.etcd_url, cluster.name, "tags/kept/")) == 2
    assert await keys_under(cluster.etcd_url, cluster.name, "repos/kept") == ["repos/kept/team/app",
                                                                              "repos/kept/team/app/nested"]
    assert cluster.cli("repo", "remove", "gone").returncode == 1


def gc_run(cluster) -> dict:
    result = cluster.cli("gc", "run", "--wait", "--json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)

