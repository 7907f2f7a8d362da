"""A node that finds its own copy missing or damaged stops advertising it (forget_copy), serves
the client from a peer meanwhile, and gets a verified copy back through placement."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.cluster.conftest import client_for
from tests.cluster.test_cluster import pull_image
from tests.support import oci
from tests.support.poll import until

pytestmark = pytest.mark.anyio


def blob_path(node, digest: str) -> Path:
    return Path(node.data_dir) / "blobs" / "sha256" / digest[7:9] / digest[7:]


def intact(node, digest: str) -> bool:
    path = blob_path(node, digest)
    return path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == digest[7:]


async def two_nodes_holding(cluster, image: oci.Image, settings: dict | None = None):
    a, b = cluster.add("a", settings=settings), cluster.add("b", settings=settings)
    async with client_for(a) as client:
        await oci.push_image(client, "dmg/app", "v1", image)
    wanted = {image.digest, *image.all_blobs()}
    until(lambda: all(cluster.holders().get(d) == {"a", "b"} for d in wanted) and all(intact(b, d) for d in wanted),
          what="both nodes to hold every blob")
    return a, b, wanted


async def test_a_damaged_copy_found_on_read_is_withdrawn_and_fetched_again(cluster):
    image = oci.build_image("damaged", layers=2, layer_size=300_000)
    a, b, wanted = await two_nodes_holding(cluster, image)
    config, first, second = list(image.all_blobs())
    blob_path(b, first).unlink()                                        # gone
    with open(blob_path(b, second), "r+b") as f:                        # truncated
        f.truncate(1000)
    manifest = blob_path(b, image.digest)                               # same size, wrong bytes
    manifest.write_bytes(manifest.read_bytes()[::-1])

    await pull_image(b, "dmg/app", image.digest, image)      # correct bytes, from a's copies

    until(lambda: all(intact(b, d) for d in wanted) and all(cluster.holders().get(d) == {"a", "b"} for d in wanted),
          what="node b to hold verified copies again")
    log = b.log_path.read_text()
    for digest in (first, second, image.digest):
        assert f"local copy of {digest} withdrawn" in log
    assert f"local copy of {config} withdrawn" not in log


async def test_the_scrub_withdraws_a_copy_whose_file_is_gone(cluster):
    settings = {"gc_grace": "2s", "gc_interval": "2s"}
    image = oci.build_image("scrubbed", layers=1)
    a, b, wanted = await two_nodes_holding(cluster, image, settings)
    layer = list(image.all_blobs())[-1]
    blob_path(b, layer).unlink()
    until(lambda: f"local copy of {layer} withdrawn" in b.log_path.read_text(),
          what="a scrub after a scheduled GC run to notice the missing file")
    until(lambda: intact(b, layer) and cluster.holders().get(layer) == {"a", "b"},
          what="node b to fetch the blob again")
