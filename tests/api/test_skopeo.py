"""Round trips with a real client: skopeo copy / inspect / list-tags.

Content is built here (tests/support/oci.py), written as an OCI image layout, copied to
the registry and back, and compared byte for byte: every blob, and the manifest digests.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support import skopeo
from tests.support.oci import (
    ACCEPT_ALL, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, build_artifact, build_image,
    build_index, describe, digest, layout_manifest, push_image, read_oci_layout,
    write_oci_layout,
)
from tests.support.skopeo import docker_ref, oci_ref

pytestmark = pytest.mark.anyio


@pytest.fixture
def layouts(tmp_path):
    def make(name: str):
        return tmp_path / name
    return make


async def registry_manifest(client: httpx.AsyncClient, repo: str, ref: str) -> httpx.Response:
    r = await client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL})
    assert r.status_code == 200, describe(r)
    return r


def assert_same_blobs(expected: dict[str, bytes], layout_dir) -> None:
    _, got = read_oci_layout(layout_dir)
    for d, data in expected.items():
        assert d in got, f"blob {d} missing after the round trip"
        assert got[d] == data, f"blob {d} differs after the round trip"
        assert digest(got[d]) == d


async def test_copy_single_image_round_trip(client, node, layouts, repo):
    image = build_image("skopeo-single", layers=3)
    src = write_oci_layout(layouts("src"), {"v1": image})
    await skopeo.copy(oci_ref(src, "v1"), docker_ref(node.host_port, repo, "v1"), "--preserve-digests")

    r = await registry_manifest(client, repo, "v1")
    assert r.content == image.manifest
    assert r.headers["Docker-Content-Digest"] == image.digest
    for d, data in image.blobs.items():
        b = await client.get(f"/v2/{repo}/blobs/{d}")
        assert b.status_code == 200 and b.content == data, describe(b)

    dst = layouts("dst")
    await skopeo.copy(docker_ref(node.host_port, repo, "v1"), oci_ref(dst, "back"), "--preserve-digests")
    entry, manifest = layout_manifest(dst, "back")
    assert entry["digest"] == image.digest
    assert manifest == image.manifest
    assert_same_blobs(image.all_blobs(), dst)


async def test_copy_by_digest(client, node, layouts, repo):
    image = build_image("skopeo-by-digest", layers=1)
    src = write_oci_layout(layouts("src"), {"v1": image})
    await skopeo.copy(oci_ref(src, "v1"), docker_ref(node.host_port, repo, "v1"), "--preserve-digests")
    dst = layouts("dst")
    await skopeo.copy(docker_ref(node.host_port, repo, image.digest), oci_ref(dst, "x"), "--preserve-digests")
    entry, manifest = layout_manifest(dst, "x")
    assert entry["digest"] == image.digest and manifest == image.manifest


async def test_copy_multi_arch_index_with_all(client, node, layouts, repo):
    index = build_index("skopeo-multi", archs=("amd64", "arm64"))
    src = write_oci_layout(layouts("src"), {"multi": index})
    await skopeo.copy(oci_ref(src, "multi"), docker_ref(node.host_port, repo, "multi"),
                      "--all", "--preserve-digests")

    r = await registry_manifest(client, repo, "multi")
    assert r.content == index.manifest
    assert r.headers["Content-Type"].split(";")[0] == OCI_INDEX
    for child in index.children:
        c = await registry_manifest(client, repo, child.digest)
        assert c.content == child.manifest

    dst = layouts("dst")
    await skopeo.copy(docker_ref(node.host_port, repo, "multi"), oci_ref(dst, "multi"),
                      "--all", "--preserve-digests")
    entry, manifest = layout_manifest(dst, "multi")
    assert entry["digest"] == index.digest and manifest == index.manifest
    _, blobs = read_oci_layout(dst)
    for child in index.children:
        assert blobs[child.digest] == child.manifest
    assert_same_blobs(index.all_blobs(), dst)


async def test_docker_manifest_list_with_all(client, node, repo):
    # An OCI layout cannot hold a Docker manifest list for skopeo, so push it over HTTP
    # and let skopeo pull it (and all its images) and push it to a second repository.
    index = build_index("skopeo-docker-list", fmt="docker")
    await push_image(client, repo, "list", index)
    raw = await skopeo.inspect(docker_ref(node.host_port, repo, "list"), raw=True)
    assert raw.rstrip(b"\n") == index.manifest
    assert digest(raw.rstrip(b"\n")) == index.digest

    other = repo + "-copy"
    await skopeo.copy(docker_ref(node.host_port, repo, "list"), docker_ref(node.host_port, other, "list"),
                      "--all", "--preserve-digests")
    r = await registry_manifest(client, other, "list")
    assert r.content == index.manifest
    assert r.headers["Content-Type"].split(";")[0] == DOCKER_LIST
    assert r.headers["Docker-Content-Digest"] == index.digest
    for child in index.children:
        c = await registry_manifest(client, other, child.digest)
        assert c.content == child.manifest
        assert c.headers["Content-Type"].split(";")[0] == DOCKER_MANIFEST
    for d, data in index.all_blobs().items():
        b = await client.get(f"/v2/{other}/blobs/{d}")
        assert b.status_code == 200 and b.content == data, describe(b)


async def test_copy_with_format_v2s2(client, node, layouts, repo):
    image = build_image("skopeo-v2s2", layers=2)
    src = write_oci_layout(layouts("src"), {"v1": image})
    await skopeo.copy(oci_ref(src, "v1"), docker_ref(node.host_port, repo, "v2s2"), "--format", "v2s2")

    r = await registry_manifest(client, repo, "v2s2")
    assert r.headers["Content-Type"].split(";")[0] == DOCKER_MANIFEST, describe(r)
    doc = json.loads(r.content)
    assert doc["mediaType"] == DOCKER_MANIFEST
    assert r.headers["Docker-Content-Digest"] == digest(r.content)
    # same layers and config bytes, now described as Docker schema2
    oci_doc = image.json
    assert [l["digest"] for l in doc["layers"]] == [l["digest"] for l in oci_doc["layers"]]
    assert doc["config"]["digest"] == oci_doc["config"]["digest"]
    for d, data in image.blobs.items():
        b = await client.get(f"/v2/{repo}/blobs/{d}")
        assert b.status_code == 200 and b.content == data, describe(b)

    raw = await skopeo.inspect(docker_ref(node.host_port, repo, "v2s2"), raw=True)
    assert raw.rstrip(b"\n") == r.content
    dst = layouts("dst")
    await skopeo.copy(docker_ref(node.host_port, repo, "v2s2"), oci_ref(dst, "back"))
    # converting back to OCI re-serialises the config, so compare the layers only
    layers = {l["digest"]: image.blobs[l["digest"]] for l in oci_doc["layers"]}
    assert_same_blobs(layers, dst)


async def test_inspect(client, node, layouts, repo):
    image = build_image("skopeo-inspect", layers=2)
    src = write_oci_layout(layouts("src"), {"v1": image})
    await skopeo.copy(oci_ref(src, "v1"), docker_ref(node.host_port, repo, "v1"), "--preserve-digests")

    info = await skopeo.inspect(docker_ref(node.host_port, repo, "v1"))
    assert info["Digest"] == image.digest
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    assert info["Layers"] == [l["digest"] for l in image.json["layers"]]
    assert "v1" in info.get("RepoTags", [])

    raw = await skopeo.inspect(docker_ref(node.host_port, repo, "v1"), raw=True)
    assert raw.rstrip(b"\n") == image.manifest
    assert digest(raw.rstrip(b"\n")) == image.digest

    config = await skopeo.inspect(docker_ref(node.host_port, repo, "v1"), config=True)
    assert config["rootfs"]["diff_ids"] == json.loads(image.blobs[image.json["config"]["digest"]])["rootfs"]["diff_ids"]


async def test_list_tags(client, node, layouts, repo):
    image = build_image("skopeo-tags", layers=1)
    src = write_oci_layout(layouts("src"), {"v1": image})
    for tag in ("v2", "latest", "v1", "1.0"):
        await skopeo.copy(oci_ref(src, "v1"), docker_ref(node.host_port, repo, tag), "--preserve-digests")
    tags = await skopeo.list_tags(docker_ref(node.host_port, repo))
    assert tags == ["1.0", "latest", "v1", "v2"]


async def test_copy_between_repositories(client, node, layouts, repo):
    image = build_image("skopeo-cross-repo", layers=2)
    src = write_oci_layout(layouts("src"), {"v1": image})
    await skopeo.copy(oci_ref(src, "v1"), docker_ref(node.host_port, repo, "v1"), "--preserve-digests")
    other = repo + "-copy"
    await skopeo.copy(docker_ref(node.host_port, repo, "v1"), docker_ref(node.host_port, other, "v1"),
                      "--preserve-digests")
    r = await registry_manifest(client, other, "v1")
    assert r.content == image.manifest
    for d, data in image.blobs.items():
        b = await client.get(f"/v2/{other}/blobs/{d}")
        assert b.status_code == 200 and b.content == data, describe(b)


async def test_copy_oci_artifact(client, node, layouts, repo):
    subject = build_image("skopeo-artifact-subject", layers=1)
    artifact = build_artifact("skopeo-artifact", artifact_type="application/vnd.example.sbom.v1+json",
                              annotations={"org.example.note": "hello"})
    src = write_oci_layout(layouts("src"), {"art": artifact, "app": subject})
    await skopeo.copy(oci_ref(src, "art"), docker_ref(node.host_port, repo, "art"), "--preserve-digests")

    r = await registry_manifest(client, repo, "art")
    assert r.content == artifact.manifest
    assert r.headers["Content-Type"].split(";")[0] == OCI_MANIFEST
    assert json.loads(r.content)["artifactType"] == "application/vnd.example.sbom.v1+json"

    dst = layouts("dst")
    await skopeo.copy(docker_ref(node.host_port, repo, "art"), oci_ref(dst, "art"), "--preserve-digests")
    entry, manifest = layout_manifest(dst, "art")
    assert entry["digest"] == artifact.digest and manifest == artifact.manifest
    assert_same_blobs(artifact.blobs, dst)


async def test_skopeo_delete(client, node, layouts, repo):
    image = build_image("skopeo-delete", layers=1)
    src = write_oci_layout(layouts("src"), {"v1": image})
    await skopeo.copy(oci_ref(src, "v1"), docker_ref(node.host_port, repo, "v1"), "--preserve-digests")
    await skopeo.copy(oci_ref(src, "v1"), docker_ref(node.host_port, repo, "keep"), "--preserve-digests")
    # skopeo resolves the tag and deletes the manifest by digest: every tag on it goes
    await skopeo.skopeo("delete", "--tls-verify=false", "--no-creds", "--authfile", "@AUTHFILE@",
                        docker_ref(node.host_port, repo, "v1"))
    for ref in ("v1", "keep", image.digest):
        r = await client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 404, describe(r)


async def test_skopeo_reports_missing_tag(node, repo):
    with pytest.raises(skopeo.SkopeoError) as err:
        await skopeo.inspect(docker_ref(node.host_port, repo, "absent"))
    assert "manifest unknown" in err.value.stderr.lower() or "not found" in err.value.stderr.lower()
