import json

import pytest

from cargohold.oci import errors
from cargohold.oci.manifest import (
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST, parse_manifest,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def image(media_type=OCI_MANIFEST, **extra):
    doc = {"schemaVersion": 2, "mediaType": media_type,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D1, "size": 2},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 10}]}
    doc.update(extra)
    return json.dumps(doc).encode()


def test_image_manifest_references_config_and_layers():
    parsed = parse_manifest(image(), OCI_MANIFEST)
    assert parsed.media_type == OCI_MANIFEST
    assert [str(b) for b in parsed.blobs] == [D1, D2]
    assert parsed.children == () and parsed.subject is None
    assert parsed.artifact_type == "application/vnd.oci.image.config.v1+json"


def test_artifact_with_subject():
    body = image(artifactType="application/vnd.example.sbom", subject={"mediaType": OCI_MANIFEST, "digest": D3, "size": 5})
    parsed = parse_manifest(body, None)
    assert str(parsed.subject) == D3 and parsed.artifact_type == "application/vnd.example.sbom"


def test_index_and_docker_list():
    for media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST):
        body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": D1, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": D2, "size": 1}]}).encode()
        parsed = parse_manifest(body, media_type)
        assert [str(c) for c in parsed.children] == [D1, D2] and parsed.blobs == ()


def test_docker_schema2_and_foreign_layers_skipped():
    doc = json.loads(image(DOCKER_MANIFEST))
    doc["layers"].append({"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                          "digest": D3, "size": 1, "urls": ["https://example.invalid/layer"]})
    parsed = parse_manifest(json.dumps(doc).encode(), DOCKER_MANIFEST)
    assert [str(b) for b in parsed.blobs] == [D1, D2]


@pytest.mark.parametrize("body,content_type", [
    (b"not json", OCI_MANIFEST),
    (b"[]", OCI_MANIFEST),
    (json.dumps({"schemaVersion": 1}).encode(), OCI_MANIFEST),
    (image(), OCI_INDEX),                                   # body says manifest, header says index
    (image(media_type="application/vnd.docker.distribution.manifest.v1+json"), None),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": "bad", "size": 1,
                                                                          "mediaType": "x"}}).encode(), None),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": D1, "size": -1,
                                                                          "mediaType": "x"}}).encode(), None),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}).encode(), None),
    (b"[" * 100_000 + b"]" * 100_000, OCI_MANIFEST),                       # issue 12 item 10: was a 500
    (b'{"schemaVersion": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", OCI_MANIFEST),
])
def test_invalid_manifests(body, content_type):
    with pytest.raises(errors.RegistryError) as info:
        parse_manifest(body, content_type)
    assert info.value.code == "MANIFEST_INVALID" and info.value.status == 400


def test_oversized_manifest_is_413():
    with pytest.raises(errors.RegistryError) as info:
        parse_manifest(b" " * (MAX_MANIFEST_BYTES + 1), OCI_MANIFEST)
    assert info.value.status == 413
