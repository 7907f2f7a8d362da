"""A cluster of two sites (`--site A`, `--site B`, one node each) on one etcd: a virtual repository
declared once with the CLI resolves the same on every node of every site: the local image that
shadows a remote one, the remote-only image, a push through the virtual name made at the other
site; skopeo pulls identical bytes everywhere."""

from __future__ import annotations

import shutil
import uuid

import pytest

from tests.support.oci import build_image
from tests.virtual.conftest import VirtualCluster, pull_identical, served, skopeo_push

pytestmark = pytest.mark.anyio

if shutil.which("skopeo") is None:
    pytest.skip("skopeo not installed (Debian package skopeo)", allow_module_level=True)


@pytest.fixture
def e2e_sites(etcd, tmp_path) -> VirtualCluster:
    cluster = VirtualCluster(etcd.url, tmp_path / "sites", f"vr-sites-{uuid.uuid4().hex[:8]}")
    try:
        cluster.add("a1", args=["--site", "A"])
        cluster.add("b1", args=["--site", "B"])
        yield cluster
    finally:
        cluster.stop_all()


async def test_every_node_of_every_site_resolves_the_same(e2e_sites, e2e_upstream, e2e_names, tmp_path):
    names, suffix = e2e_names, uuid.uuid4().hex[:6]
    shadowed, remote_only = f"library/both-{suffix}", f"library/remote-{suffix}"
    images = {name: build_image(f"{name}-upstream") for name in (shadowed, remote_only)}
    for name, image in images.items():
        e2e_upstream.seed(tmp_path, name, "v1", image)
    hub = e2e_sites.add_remote(names.hub, e2e_upstream.url)
    dev = e2e_sites.add_virtual(names.dev, [names.team_a, hub], "--deploy-to", names.team_a)
    a1, b1 = e2e_sites.members
    local, app = build_image(f"{shadowed}-local"), build_image(f"app-{suffix}")
    skopeo_push(a1, tmp_path, f"{dev}/{shadowed}", "v1", local)       # shadows the upstream's
    skopeo_push(b1, tmp_path, f"{dev}/app", "1.0", app)

    expected = {f"{dev}/{shadowed}:v1": (local, f"{names.team_a}/{shadowed}"),
                f"{dev}/{remote_only}:v1": (images[remote_only], f"{hub}/{remote_only}"),
                f"{dev}/app:1.0": (app, f"{names.team_a}/app")}
    for node in (a1, b1):
        for reference, (image, member) in expected.items():
            name, tag = reference.rsplit(":", 1)
            answer = served(node, name, tag)
            assert (answer.status, answer.digest, answer.member) == (200, image.digest, member), (node.url, reference)
            await pull_identical(node, name, tag, image, tmp_path)
