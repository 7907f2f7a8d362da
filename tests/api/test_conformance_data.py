"""Manifests of the kinds the OCI conformance program pushes that the other API tests do not:
what the registry must accept, give back byte for byte, and still refuse.

* A manifest of about 3.9 MB (hundreds of long annotations), sent without Content-Length
  (chunked transfer encoding, as Go's client sends a body it cannot measure).
* An index that lists no manifests.
* Non-distributable layers: descriptors with `urls` and a non-distributable media type whose
  blobs are never pushed (image-spec 1.1 deprecates them, registries still accept them). A
  layer of an ordinary media type with `urls` is still a blob the repository must have.
* Descriptors with a `data` field and fields no spec defines: kept as they are.
* A referrer whose subject was never pushed: accepted, and listed by the referrers API.
"""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.support.oci import (
    OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, build_artifact, build_image, canonical_json, describe, descriptor,
    digest, error_codes, image_config, push_blob, random_bytes, random_layer,
)

pytestmark = pytest.mark.anyio

NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"


def chunks(body: bytes, size: int = 64 * 1024):
    """The body as a stream of unknown length: httpx sends it with chunked transfer encoding."""
    async def stream():
        for i in range(0, len(body), size):
            yield body[i:i + size]
    return stream()


async def put_manifest(client: httpx.AsyncClient, repo: str, ref: str, body: bytes, media_type: str,
                       *, streamed: bool = False) -> httpx.Response:
    return await client.put(f"/v2/{repo}/manifests/{ref}", content=chunks(body) if streamed else body,
                            headers={"Content-Type": media_type})


async def push_accepted(client: httpx.AsyncClient, repo: str, ref: str, body: bytes, media_type: str,
                        blobs=(), *, streamed: bool = False) -> httpx.Response:
    """Push `blobs`, then the manifest: 201, and the registry serves it byte for byte."""
    for data in blobs:
        await push_blob(client, repo, data)
    r = await put_manifest(client, repo, ref, body, media_type, streamed=streamed)
    assert r.status_code == 201, describe(r)
    await assert_served(client, repo, ref, body, media_type)
    return r


async def assert_served(client: httpx.AsyncClient, repo: str, ref: str, body: bytes, media_type: str) -> None:
    r = await client.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"})
    assert r.status_code == 200 and r.content == body, describe(r)
    assert r.headers["Content-Type"] == media_type and r.headers["Content-Length"] == str(len(body)), describe(r)
    head = await client.head(f"/v2/{repo}/manifests/{ref}")
    assert head.headers.get("Docker-Content-Digest") == digest(body), describe(head)


async def test_a_3_9_megabyte_manifest_streamed_without_content_length(client, repo):
    annotations = {f"large-annotation-{i}": "A" * 10_000 for i in range(390)}
    image = build_image("large-manifest", annotations=annotations)
    assert 3_900_000 < len(image.manifest) < 4 * 1024 * 1024
    await push_accepted(client, repo, "large-manifest", image.manifest, image.media_type, image.blobs.values(),
                        streamed=True)


async def test_an_index_that_lists_no_manifests(client, repo):
    body = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    await push_accepted(client, repo, "empty", body, OCI_INDEX, streamed=True)
    assert (await client.delete(f"/v2/{repo}/manifests/{digest(body)}")).status_code == 202


def with_foreign_layer(layer_media_type: str) -> tuple[bytes, bytes, bytes]:
    """(manifest, config, pushed layer) of an image whose first layer lives at a URL."""
    foreign = random_bytes(256, f"foreign-{layer_media_type}")
    pushed = random_layer("pushed-next-to-a-foreign-layer")
    config = image_config([pushed], seed="foreign")
    layers = [descriptor(layer_media_type, foreign, urls=[f"https://store.example.com/blobs/{digest(foreign)}"]),
              descriptor(OCI_LAYER_GZIP, pushed)]
    body = canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptor("application/vnd.oci.image.config.v1+json", config), "layers": layers})
    return body, config, pushed


async def test_non_distributable_layers_need_not_be_pushed(client, repo):
    body, config, pushed = with_foreign_layer(NONDISTRIBUTABLE)
    await push_accepted(client, repo, "non-distributable", body, OCI_MANIFEST, (config, pushed))


async def test_an_ordinary_layer_with_urls_must_still_be_in_the_repository(client, repo):
    body, config, pushed = with_foreign_layer(OCI_LAYER_GZIP)
    for data in (config, pushed):
        await push_blob(client, repo, data)
    r = await put_manifest(client, repo, "urls-are-no-excuse", body, OCI_MANIFEST)
    assert r.status_code == 400, describe(r)
    assert error_codes(r) == ["MANIFEST_BLOB_UNKNOWN"], describe(r)


async def test_data_fields_and_unknown_fields_are_kept_byte_for_byte(client, repo):
    layer = random_layer("data-field")
    config = image_config([layer], seed="data-field")
    config_descriptor = {**descriptor("application/vnd.oci.image.config.v1+json", config),
                         "data": base64.b64encode(config).decode(), "org.example.unknown": "kept"}
    body = canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_descriptor,
                           "layers": [descriptor(OCI_LAYER_GZIP, layer)], "org.example.custom": "also kept"})
    await push_accepted(client, repo, "data-field", body, OCI_MANIFEST, (config, layer))


async def test_a_referrer_of_a_subject_never_pushed_is_listed(client, repo):
    subject = {"mediaType": OCI_MANIFEST, "size": 123, "digest": digest(b"missing content")}
    artifact = build_artifact("orphan-referrer", subject=subject, annotations={"org.example.note": "orphan"})
    r = await push_accepted(client, repo, artifact.digest, artifact.manifest, OCI_MANIFEST, artifact.blobs.values())
    assert r.headers.get("OCI-Subject") == subject["digest"], describe(r)
    listed = await client.get(f"/v2/{repo}/referrers/{subject['digest']}")
    assert listed.status_code == 200 and listed.headers["Content-Type"] == OCI_INDEX, describe(listed)
    [entry] = listed.json()["manifests"]
    assert entry["digest"] == artifact.digest and entry["size"] == len(artifact.manifest), entry
    assert entry["annotations"] == {"org.example.note": "orphan"}, entry
