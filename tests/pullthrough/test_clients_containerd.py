"""containerd (`ctr images pull`, a private daemon) through the pull-through cache: as a namespace
(`NODE/<remote repo>/library/x:tag`) and as a registry mirror (`--hosts-dir`: containerd asks the
mirror for `/v2/library/x/...?ns=<upstream host>`), with the upstream's digest in both cases; and a
multi-arch index, of which the cache fetches only the platform containerd asks for."""

from __future__ import annotations

import re
import uuid

import pytest

from tests.pullthrough.conftest import pullthrough_counts, user_agents
from tests.support.accesslog import settled_log
from tests.support.containerd import containerd_or_skip, image_digest
from tests.support.oci import build_image, build_index

MIRROR_HOSTS_TOML = """\
server = "http://{upstream}"

[host."http://{mirror}"]
  capabilities = ["pull", "resolve"]
"""


@pytest.fixture(scope="module")
def ctr(tmp_path_factory):
    with containerd_or_skip(tmp_path_factory.mktemp("containerd") / "root") as run:
        yield run


def _seeded(upstreams, tmp_path, name: str):
    upstream = upstreams.distribution()
    image = build_image(f"ctr-{uuid.uuid4().hex[:8]}", layers=2, layer_size=100_000)
    upstream.seed(tmp_path, name, "v1", image)
    return upstream, image


def test_ctr_pulls_through_the_namespace(ctr, upstreams, cache_cluster, remote_name, tmp_path):
    upstream, image = _seeded(upstreams, tmp_path, "library/ctr-namespace")
    cache_cluster.add_remote(remote_name, upstream.url)
    node = cache_cluster.members[2]
    ref = f"{node.host_port}/{remote_name}/library/ctr-namespace:v1"

    ctr("images", "pull", "--plain-http", ref)

    assert image_digest(ctr, ref) == image.digest
    for blob in image.blobs:          # each blob fetched from the upstream once
        assert len(upstream.logged(f"/blobs/{blob}", "GET")) == 1, blob
    # from then on ordinary blobs of the cluster: placed and copied to replicas_per_site (2) nodes
    cache_cluster.wait_until(lambda: all(len(cache_cluster.holders().get(blob, ())) >= 2 for blob in image.blobs),
                             what="the cached blobs are replicated like pushed ones")


def test_ctr_uses_the_cache_as_a_mirror(ctr, upstreams, cache_cluster, remote_name, tmp_path):
    upstream, image = _seeded(upstreams, tmp_path, "library/ctr-mirror")
    cache_cluster.add_remote(remote_name, upstream.url)
    node = cache_cluster.members[0]
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / upstream.host_port).mkdir(parents=True)
    (hosts_dir / upstream.host_port / "hosts.toml").write_text(
        MIRROR_HOSTS_TOML.format(upstream=upstream.host_port, mirror=node.host_port))
    ref = f"{upstream.host_port}/library/ctr-mirror:v1"

    ctr("images", "pull", "--hosts-dir", str(hosts_dir), ref)

    assert image_digest(ctr, ref) == image.digest
    # The cache answered the mirror requests: they name `library/ctr-mirror` without the remote
    # repository's prefix, which only `?ns=<upstream host>` routes to it...
    log = settled_log(node.url, node.log_path)
    assert re.search(r"GET /v2/library/ctr-mirror/manifests/\S+ 200", log), log[-3000:]
    for blob in image.blobs:
        assert f"GET /v2/library/ctr-mirror/blobs/{blob} 200" in log, blob
    assert pullthrough_counts(node, remote_name).get("miss", 0) >= 1
    # ...and containerd never went around the mirror: the cache asked the upstream, containerd did not
    # (skopeo's requests there are the seeding).
    agents = user_agents(upstream, "/v2/library/ctr-mirror/")
    assert any(agent.startswith("cargohold") for agent in agents), agents
    assert not any(agent.startswith("containerd") for agent in agents), agents


def test_ctr_pulls_one_platform_of_an_index_and_the_cache_fetches_only_that(ctr, upstreams, cache_cluster,
                                                                             remote_name, tmp_path):
    upstream = upstreams.distribution()
    index = build_index(f"ctr-index-{uuid.uuid4().hex[:8]}", archs=("amd64", "arm64"))
    upstream.seed(tmp_path, "library/multi", "v1", index)
    cache_cluster.add_remote(remote_name, upstream.url)
    node = cache_cluster.members[1]
    ref = f"{node.host_port}/{remote_name}/library/multi:v1"

    ctr("images", "pull", "--plain-http", "--platform", "linux/amd64", ref)

    assert image_digest(ctr, ref) == index.digest
    amd64, arm64 = index.children
    assert len(upstream.logged(f"/manifests/{amd64.digest}", "GET")) == 1
    for blob in amd64.blobs:
        assert len(upstream.logged(f"/blobs/{blob}", "GET")) == 1, blob
    # the other platform's child and blobs: children are fetched on demand, and nobody asked
    # (what the upstream's log has of them is the seeding's HEADs and PUTs)
    assert not upstream.logged(f"/manifests/{arm64.digest}", "GET")
    assert not any(upstream.logged(f"/blobs/{blob}", "GET") for blob in arm64.blobs)
