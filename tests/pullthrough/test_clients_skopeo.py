"""skopeo through the pull-through cache: `docker://NODE/<remote repo>/<upstream name>:<tag>` gives
the upstream's image byte for byte, whatever the upstream's auth (none, htpasswd Basic, the Docker
token flow of a second cargohold), and once cached it is served by every node of the cluster. And
the cache as a Docker-style registry mirror (`--docker-mirror`): requests for the upstream's names
with no namespace and no `ns`, as Docker's `registry-mirrors` and containers-registries.conf send them."""

from __future__ import annotations

import json
import shutil
import uuid

import httpx
import pytest

from tests.pullthrough.conftest import cache_state, user_agents
from tests.support.accesslog import settled_log
from tests.support.oci import build_image, digest, layout_manifest, read_oci_layout
from tests.support.poll import until
from tests.support.skopeo import copy, inspect, skopeo

pytestmark = pytest.mark.anyio

if shutil.which("skopeo") is None:
    pytest.skip("skopeo not installed (Debian package skopeo)", allow_module_level=True)


@pytest.fixture(params=["plain", "basic", "bearer"])
def seeded(request, upstreams, tmp_path):
    """(upstream, remote repository options, upstream name, tag, image) for each kind of upstream auth.
    The basic and bearer upstreams refuse anonymous pulls of the name, so a pull through the cache
    proves it used the stored credentials (Basic on every request, or a token obtained with them)."""
    image = build_image(f"skopeo-{request.param}-{uuid.uuid4().hex[:6]}", layers=3, layer_size=50_000)
    if request.param == "bearer":
        upstream = request.getfixturevalue("bearer_upstream")
        name, username, password = "team/app", "alice", "alice-password"   # tests/auth's accounts
    else:
        upstream = upstreams.distribution(basic=request.param == "basic")
        name = "library/skopeo"
        username, password = upstream.credentials or (None, None)
    tag = f"v-{uuid.uuid4().hex[:6]}"
    upstream.seed(tmp_path, name, tag, image)
    return upstream, {"username": username, "password": password}, name, tag, image


async def test_skopeo_pulls_the_upstream_image_byte_for_byte(seeded, cache_cluster, remote_name, tmp_path):
    upstream, credentials, name, tag, image = seeded
    cache_cluster.add_remote(remote_name, upstream.url, **credentials)
    first, second = cache_cluster.members[:2]
    through_first = f"docker://{first.host_port}/{remote_name}/{name}:{tag}"

    raw = await inspect(through_first, raw=True)
    assert raw == image.manifest                                   # the manifest's exact bytes
    assert (await inspect(through_first))["Digest"] == image.digest

    layout = tmp_path / "pulled"
    await copy(through_first, f"oci:{layout}:{tag}")
    entry, manifest = layout_manifest(layout, tag)
    assert entry["digest"] == image.digest and manifest == image.manifest
    pulled = read_oci_layout(layout)[1]
    for blob_digest, data in image.blobs.items():
        assert digest(pulled[blob_digest]) == blob_digest and pulled[blob_digest] == data

    # cached now: another node serves the same bytes, and says it comes from the cache
    again = tmp_path / "again"
    await copy(f"docker://{second.host_port}/{remote_name}/{name}:{tag}", f"oci:{again}:{tag}")
    assert layout_manifest(again, tag)[1] == image.manifest
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as client:
        config = image.json["config"]["digest"]
        response = await client.get(f"/v2/{remote_name}/{name}/blobs/{config}")
        assert response.status_code == 200 and response.content == image.blobs[config]
        assert cache_state(response) == "hit"
    # the operator's view, summed over the nodes: misses on the first, hits on the second
    until(lambda: _figures_show_the_pulls(cache_cluster, remote_name, image), interval=0.5,
          what="`cargohold repo status` counts the pulls")


def _figures_show_the_pulls(cache_cluster, remote_name: str, image) -> bool:
    done = cache_cluster.cli("repo", "status", remote_name, "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)[remote_name]
    assert figures["misses"] >= 1 and figures["hits"] >= 1, figures
    assert figures["bytes_from_upstream"] >= sum(len(data) for data in image.blobs.values()), figures
    return True


REGISTRIES_CONF = """\
[[registry]]
location = "{upstream}"
insecure = true

[[registry.mirror]]
location = "{mirror}"
insecure = true
"""


async def test_skopeo_uses_the_cache_as_a_docker_registry_mirror(upstreams, cache_cluster, remote_name, tmp_path):
    upstream = upstreams.distribution()
    image = build_image(f"docker-mirror-{uuid.uuid4().hex[:6]}")
    upstream.seed(tmp_path, "library/mirrored", "v1", image)
    cache_cluster.add_remote(remote_name, upstream.url, "--docker-mirror")
    try:
        node = cache_cluster.members[2]
        registries = tmp_path / "registries.conf"
        registries.write_text(REGISTRIES_CONF.format(upstream=upstream.host_port, mirror=node.host_port))
        layout = tmp_path / "pulled"

        await skopeo("--registries-conf", str(registries), "copy", "--src-tls-verify=false", "--src-no-creds",
                     "--authfile", "@AUTHFILE@", f"docker://{upstream.host_port}/library/mirrored:v1",
                     f"oci:{layout}:v1")

        assert layout_manifest(layout, "v1")[1] == image.manifest
        log = settled_log(node.url, node.log_path)          # the mirror served the unprefixed names...
        for blob in image.blobs:
            assert f"GET /v2/library/mirrored/blobs/{blob} 200" in log, blob
        # ...and skopeo never went around it (its requests there are the seeding's, which GETs no blob)
        assert not user_agents(upstream, "/v2/library/mirrored/blobs/", "GET") - {"cargohold-upstream"}
    finally:
        cache_cluster.cli("repo", "remove", remote_name)    # one docker mirror per cluster at most
