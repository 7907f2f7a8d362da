"""Manifests: push, pull, HEAD, delete, validation, names and references.

Spec statements (distribution-spec v1.1 spec.md) the tests rely on:
* GET manifest: 200, "Content-Type: <manifest media type>", Docker-Content-Digest,
  body "byte-for-byte as stored"; "404 Not Found if the manifest does not exist".
* HEAD: 200 with Docker-Content-Digest and Content-Length, no body.
* PUT: "MUST return 201 Created", "MUST include Location", Docker-Content-Digest
  "MUST contain the digest of the uploaded manifest and MUST match the digest provided
  by the client".
* "A registry may reject a manifest if it contains descriptors (other than the subject
  field) that reference blobs or manifests that do not exist ... must return one or more
  MANIFEST_BLOB_UNKNOWN errors."
* "Registries SHOULD enforce a maximum manifest size ... SHOULD respond with 413";
  "SHOULD expect to support manifest uploads of at least 4 MiB".
* DELETE by digest / tag: 202; "Once deleted, a GET ... will return a 404".
* <name> grammar `[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(\\/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*`;
  tag grammar `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import anyio
import pytest

from tests.support.oci import (
    ACCEPT_ALL, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Image, build_image,
    build_index, canonical_json, describe, digest, error_codes, push_blob, push_image,
    push_manifest, random_layer, raw_error_codes, raw_request,
)

pytestmark = pytest.mark.anyio

ACCEPT = {"Accept": ACCEPT_ALL}


def make(kind: str, seed: str) -> Image:
    return {
        "oci": lambda: build_image(seed, fmt="oci"),
        "oci-index": lambda: build_index(seed, fmt="oci"),
        "docker": lambda: build_image(seed, fmt="docker"),
        "docker-list": lambda: build_index(seed, fmt="docker"),
    }[kind]()


KINDS = ["oci", "oci-index", "docker", "docker-list"]


async def push_content(client, repo: str, image: Image) -> None:
    """Everything a manifest refers to: blobs, and child manifests by digest."""
    for data in image.blobs.values():
        await push_blob(client, repo, data)
    for child in image.children:
        await push_image(client, repo, None, child)


def assert_manifest_response(r, image: Image, *, head: bool = False) -> None:
    assert r.status_code == 200, describe(r)
    assert r.headers.get("Content-Type", "").split(";")[0].strip() == image.media_type, describe(r)
    assert r.headers.get("Docker-Content-Digest") == image.digest, describe(r)
    assert int(r.headers.get("Content-Length", -1)) == image.size, describe(r)
    if head:
        assert r.content == b""
    else:
        assert r.content == image.manifest  # byte for byte


async def assert_manifest_absent(client, repo: str, ref: str, codes=("MANIFEST_UNKNOWN",)):
    r = await client.get(f"/v2/{repo}/manifests/{ref}", headers=ACCEPT)
    assert r.status_code == 404, describe(r)
    assert error_codes(r) and error_codes(r)[0] in codes, describe(r)
    r = await client.head(f"/v2/{repo}/manifests/{ref}", headers=ACCEPT)
    assert r.status_code == 404, describe(r)


async def make_repo_exist(client, repo: str) -> Image:
    base = build_image(f"base-{repo}")
    await push_image(client, repo, "base", base)
    return base


# -- push and pull ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
async def test_put_get_head_by_tag_and_digest(client, repo, kind):
    image = make(kind, f"pgh-{kind}")
    await push_content(client, repo, image)
    r = await push_manifest(client, repo, "v1", image.manifest, image.media_type)
    assert r.status_code == 201, describe(r)
    assert r.headers.get("Docker-Content-Digest") == image.digest, describe(r)
    location = r.headers.get("Location")
    assert location, describe(r)
    got = await client.get(location, headers=ACCEPT)  # "a pullable manifest URL"
    assert_manifest_response(got, image)

    for ref in ("v1", image.digest):
        assert_manifest_response(await client.get(f"/v2/{repo}/manifests/{ref}", headers=ACCEPT), image)
        assert_manifest_response(await client.head(f"/v2/{repo}/manifests/{ref}", headers=ACCEPT),
                                 image, head=True)


@pytest.mark.parametrize("kind", KINDS)
async def test_put_by_digest(client, repo, kind):
    image = make(kind, f"pbd-{kind}")
    await push_content(client, repo, image)
    r = await push_manifest(client, repo, image.digest, image.manifest, image.media_type)
    assert r.status_code == 201, describe(r)
    assert r.headers.get("Docker-Content-Digest") == image.digest, describe(r)
    assert r.headers.get("Location"), describe(r)
    assert_manifest_response(await client.get(f"/v2/{repo}/manifests/{image.digest}", headers=ACCEPT), image)


async def test_index_children_are_pullable(client, repo):
    index = build_index("children")
    await push_image(client, repo, "multi", index)
    doc = json.loads((await client.get(f"/v2/{repo}/manifests/multi", headers=ACCEPT)).content)
    assert [m["platform"]["architecture"] for m in doc["manifests"]] == ["amd64", "arm64"]
    for child, entry in zip(index.children, doc["manifests"]):
        assert entry["digest"] == child.digest
        assert_manifest_response(await client.get(f"/v2/{repo}/manifests/{child.digest}", headers=ACCEPT), child)
        for d, data in child.blobs.items():
            r = await client.get(f"/v2/{repo}/blobs/{d}")
            assert r.status_code == 200 and r.content == data, describe(r)


async def test_retag_moves_tag_and_keeps_old_manifest(client, repo):
    a, b = build_image("retag-a"), build_image("retag-b")
    await push_image(client, repo, "latest", a)
    await push_image(client, repo, "latest", b)
    assert_manifest_response(await client.get(f"/v2/{repo}/manifests/latest", headers=ACCEPT), b)
    assert_manifest_response(await client.get(f"/v2/{repo}/manifests/{a.digest}", headers=ACCEPT), a)


async def test_same_manifest_pushed_twice_is_idempotent(client, repo):
    image = build_image("twice")
    await push_image(client, repo, "one", image)
    r = await push_manifest(client, repo, "one", image.manifest, image.media_type)
    assert r.status_code == 201, describe(r)
    r = await push_manifest(client, repo, "two", image.manifest, image.media_type)
    assert r.status_code == 201, describe(r)
    for ref in ("one", "two", image.digest):
        assert_manifest_response(await client.get(f"/v2/{repo}/manifests/{ref}", headers=ACCEPT), image)


@pytest.mark.parametrize("tag", ["Latest", "v1.0.0-RC_1", "_underscore", "9", "a" * 128])
async def test_valid_tag_formats(client, repo, tag):
    image = build_image(f"tag-{tag[:10]}")
    await push_content(client, repo, image)
    r = await push_manifest(client, repo, tag, image.manifest, image.media_type)
    assert r.status_code == 201, describe(r)
    assert_manifest_response(await client.get(f"/v2/{repo}/manifests/{tag}", headers=ACCEPT), image)


async def test_manifest_by_sha512_digest(client, repo):
    image = build_image("sha512-manifest")
    await push_content(client, repo, image)
    d512 = "sha512:" + hashlib.sha512(image.manifest).hexdigest()
    r = await push_manifest(client, repo, d512, image.manifest, image.media_type)
    assert r.status_code == 201, describe(r)
    r = await client.get(f"/v2/{repo}/manifests/{d512}", headers=ACCEPT)
    assert r.status_code == 200, describe(r)
    assert r.content == image.manifest
    served = r.headers.get("Docker-Content-Digest")
    assert served in (d512, image.digest), describe(r)


async def test_manifest_up_to_4mib_is_accepted(client, repo):
    image = big_manifest(f"big-ok-{repo}", 4 * 1024 * 1024 - 64)
    await push_content(client, repo, image)
    assert len(image.manifest) <= 4 * 1024 * 1024
    r = await push_manifest(client, repo, "big", image.manifest, image.media_type)
    assert r.status_code == 201, describe(r)
    r = await client.get(f"/v2/{repo}/manifests/big", headers=ACCEPT)
    assert r.status_code == 200 and r.content == image.manifest, describe(r)


def big_manifest(seed: str, size: int) -> Image:
    """An OCI manifest of exactly ``size`` bytes (padded with an annotation)."""
    base = build_image(seed, layers=1)
    doc = base.json
    doc["annotations"] = {"pad": ""}
    pad = size - len(canonical_json(doc))
    assert pad > 0
    doc["annotations"]["pad"] = "x" * pad
    body = canonical_json(doc)
    assert len(body) == size
    return Image(body, OCI_MANIFEST, base.blobs)


# -- refused manifests ---------------------------------------------------------------------------
async def test_oversized_manifest_is_413(client, repo):
    await make_repo_exist(client, repo)
    image = big_manifest(f"big-{repo}", 4 * 1024 * 1024 + 1024)
    await push_content(client, repo, image)
    r = await push_manifest(client, repo, "huge", image.manifest, image.media_type)
    assert r.status_code == 413, describe(r)
    codes = error_codes(r)
    assert codes and codes[0] in ("SIZE_INVALID", "MANIFEST_INVALID"), describe(r)
    assert r.json()["errors"][0].get("message"), describe(r)
    await assert_manifest_absent(client, repo, "huge")
    await assert_manifest_absent(client, repo, image.digest)


async def test_put_by_digest_with_mismatching_body_is_digest_invalid(client, repo):
    await make_repo_exist(client, repo)
    image, other = build_image("mismatch-a"), build_image("mismatch-b")
    await push_content(client, repo, image)
    r = await push_manifest(client, repo, other.digest, image.manifest, image.media_type)
    assert r.status_code == 400, describe(r)
    assert error_codes(r) == ["DIGEST_INVALID"], describe(r)
    await assert_manifest_absent(client, repo, other.digest)
    await assert_manifest_absent(client, repo, image.digest)


@pytest.mark.parametrize("missing", ["config", "layer"])
async def test_unknown_blob_is_manifest_blob_unknown(client, repo, missing):
    await make_repo_exist(client, repo)
    image = build_image(f"missing-{missing}")
    doc = image.json
    skip = doc["config"]["digest"] if missing == "config" else doc["layers"][-1]["digest"]
    for d, data in image.blobs.items():
        if d != skip:
            await push_blob(client, repo, data)
    r = await push_manifest(client, repo, "broken", image.manifest, image.media_type)
    assert r.status_code == 400, describe(r)
    codes = error_codes(r)
    assert codes and set(codes) == {"MANIFEST_BLOB_UNKNOWN"}, describe(r)
    await assert_manifest_absent(client, repo, "broken")
    await assert_manifest_absent(client, repo, image.digest)


async def test_index_with_unknown_child_is_manifest_blob_unknown(client, repo):
    await make_repo_exist(client, repo)
    index = build_index("unknown-child")
    # push only the first child
    await push_image(client, repo, None, index.children[0])
    for data in index.children[1].blobs.values():
        await push_blob(client, repo, data)
    r = await push_manifest(client, repo, "multi", index.manifest, index.media_type)
    assert r.status_code == 400, describe(r)
    codes = error_codes(r)
    assert codes and set(codes) == {"MANIFEST_BLOB_UNKNOWN"}, describe(r)
    await assert_manifest_absent(client, repo, "multi")
    await assert_manifest_absent(client, repo, index.digest)


def _invalid_bodies():
    img = build_image("invalid-bodies")
    doc = img.json
    v1 = dict(doc, schemaVersion=1)
    v3 = dict(doc, schemaVersion=3)
    no_config = {k: v for k, v in doc.items() if k != "config"}
    bad_layers = dict(doc, layers="not a list")
    docker_type = dict(doc, mediaType=DOCKER_MANIFEST)
    no_schema = {k: v for k, v in doc.items() if k != "schemaVersion"}
    index_as_manifest = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    return img, {
        "malformed-json": (b'{"schemaVersion": 2, "mediaType": ', OCI_MANIFEST),
        "not-an-object": (b'["schemaVersion", 2]', OCI_MANIFEST),
        "schema-version-1": (canonical_json(v1), OCI_MANIFEST),
        "schema-version-3": (canonical_json(v3), OCI_MANIFEST),
        "no-schema-version": (canonical_json(no_schema), OCI_MANIFEST),
        "no-config": (canonical_json(no_config), OCI_MANIFEST),
        "layers-not-a-list": (canonical_json(bad_layers), OCI_MANIFEST),
        "media-type-mismatch": (canonical_json(docker_type), OCI_MANIFEST),
        "index-body-manifest-type": (canonical_json(index_as_manifest), OCI_MANIFEST),
        "empty-body": (b"", OCI_MANIFEST),
    }


@pytest.mark.parametrize("case", list(_invalid_bodies()[1]))
async def test_invalid_manifest_is_manifest_invalid(client, repo, case):
    await make_repo_exist(client, repo)
    img, cases = _invalid_bodies()
    await push_content(client, repo, img)
    body, media_type = cases[case]
    r = await push_manifest(client, repo, "bad", body, media_type)
    assert r.status_code == 400, describe(r)
    assert error_codes(r) == ["MANIFEST_INVALID"], describe(r)
    await assert_manifest_absent(client, repo, "bad")
    await assert_manifest_absent(client, repo, digest(body))


async def test_layer_with_malformed_digest_is_refused(client, repo):
    await make_repo_exist(client, repo)
    img = build_image("bad-layer-digest")
    await push_content(client, repo, img)
    doc = img.json
    doc["layers"][0]["digest"] = "sha256:not-hex"
    body = canonical_json(doc)
    r = await push_manifest(client, repo, "bad", body, OCI_MANIFEST)
    assert r.status_code == 400, describe(r)
    # "DIGEST_INVALID ... MAY also be returned when a manifest includes an invalid layer digest"
    assert error_codes(r) and error_codes(r)[0] in ("MANIFEST_INVALID", "DIGEST_INVALID"), describe(r)
    await assert_manifest_absent(client, repo, "bad")


# -- delete ------------------------------------------------------------------------------------------
async def test_delete_by_digest(client, repo):
    image = build_image("del-digest")
    await push_image(client, repo, "gone", image)
    keep = await make_repo_exist(client, repo)
    r = await client.delete(f"/v2/{repo}/manifests/{image.digest}")
    assert r.status_code == 202, describe(r)
    await assert_manifest_absent(client, repo, image.digest)
    # "and any tag pointing to that digest will return a 404"
    await assert_manifest_absent(client, repo, "gone")
    assert_manifest_response(await client.get(f"/v2/{repo}/manifests/base", headers=ACCEPT), keep)
    r = await client.delete(f"/v2/{repo}/manifests/{image.digest}")
    assert r.status_code == 404, describe(r)
    assert error_codes(r) == ["MANIFEST_UNKNOWN"], describe(r)


async def test_delete_by_tag(client, repo):
    image = build_image("del-tag")
    await push_image(client, repo, "t1", image)
    await push_manifest(client, repo, "t2", image.manifest, image.media_type)
    r = await client.delete(f"/v2/{repo}/manifests/t1")
    assert r.status_code == 202, describe(r)
    await assert_manifest_absent(client, repo, "t1")
    # the manifest itself and its other tags stay
    assert_manifest_response(await client.get(f"/v2/{repo}/manifests/{image.digest}", headers=ACCEPT), image)
    assert_manifest_response(await client.get(f"/v2/{repo}/manifests/t2", headers=ACCEPT), image)
    r = await client.get(f"/v2/{repo}/tags/list")
    assert r.status_code == 200, describe(r)
    assert "t1" not in r.json()["tags"] and "t2" in r.json()["tags"], describe(r)


async def test_delete_unknown_manifest_is_404(client, repo):
    await make_repo_exist(client, repo)
    r = await client.delete(f"/v2/{repo}/manifests/{digest(b'no such manifest')}")
    assert r.status_code == 404, describe(r)
    assert error_codes(r) == ["MANIFEST_UNKNOWN"], describe(r)
    r = await client.delete(f"/v2/{repo}/manifests/no-such-tag")
    assert r.status_code == 404, describe(r)
    assert error_codes(r) == ["MANIFEST_UNKNOWN"], describe(r)


async def test_unknown_tag_is_404_manifest_unknown(client, repo):
    await make_repo_exist(client, repo)
    await assert_manifest_absent(client, repo, "nope")
    await assert_manifest_absent(client, repo, digest(b"nope"))


async def test_unknown_repository_manifest_is_404(client, repo):
    r = await client.get(f"/v2/{repo}-never-pushed/manifests/latest", headers=ACCEPT)
    assert r.status_code == 404, describe(r)
    assert error_codes(r) and error_codes(r)[0] in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN"), describe(r)


# -- invalid references ------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["-leading-dash", ".leading-dot", "a" * 129, "bad%21tag", "bad+tag"])
async def test_invalid_tag_is_refused(client, repo, tag):
    await make_repo_exist(client, repo)
    image = build_image("bad-tag")
    await push_content(client, repo, image)
    r = await push_manifest(client, repo, tag, image.manifest, image.media_type)
    assert r.status_code == 400, describe(r)
    # v1.1 lists no TAG_INVALID code; older text had TAG_INVALID. Either is acceptable.
    assert error_codes(r) and error_codes(r)[0] in ("MANIFEST_INVALID", "TAG_INVALID"), describe(r)
    r = await client.get(f"/v2/{repo}/tags/list")
    assert sorted(r.json()["tags"]) == ["base"], describe(r)


# The distribution-spec conformance suite asks for `.INVALID_MANIFEST_NAME`: a reference that
# is neither a tag nor a digest names no manifest (404 MANIFEST_UNKNOWN, as Distribution and zot).
@pytest.mark.parametrize("ref", [".INVALID_MANIFEST_NAME", "-leading-dash", "sha256:1234"])
async def test_reading_a_reference_that_cannot_exist_is_manifest_unknown(client, repo, ref):
    await make_repo_exist(client, repo)
    for method in ("GET", "HEAD", "DELETE"):
        r = await client.request(method, f"/v2/{repo}/manifests/{ref}", headers=ACCEPT)
        assert r.status_code == 404, (method, describe(r))
        if method != "HEAD":
            assert error_codes(r) == ["MANIFEST_UNKNOWN"], (method, describe(r))


@pytest.mark.parametrize("ref", ["sha256:1234", "sha256:" + "z" * 64, "md5:" + "a" * 32])
async def test_malformed_digest_reference(client, repo, ref):
    await make_repo_exist(client, repo)
    image = build_image("bad-digest-ref")
    await push_content(client, repo, image)
    r = await push_manifest(client, repo, ref, image.manifest, image.media_type)
    assert r.status_code == 400, describe(r)
    assert error_codes(r) and error_codes(r)[0] in ("DIGEST_INVALID", "MANIFEST_INVALID", "UNSUPPORTED"), describe(r)
    r = await client.get(f"/v2/{repo}/manifests/{ref}", headers=ACCEPT)
    assert r.status_code in (400, 404), describe(r)


# -- repository names ---------------------------------------------------------------------------------
INVALID_NAMES = {
    "upper-case": "Upper/Case",
    "upper-component": "ok/NotOk",
    "dot-dot": "a/../b",
    "double-dot-in-component": "a..b",
    "leading-separator": "-leading",
    "trailing-separator": "trailing-",
    "leading-dot": ".hidden",
    "trailing-dot": "trailing.",
    "trailing-slash": "trailing/",
    "double-slash": "a//b",
    "too-long": "/".join(["a" * 50] * 5) + "/a",  # 256 characters
    "bad-char": "bad!name",
    "triple-underscore": "a___b",
}


def test_too_long_name_is_256_chars():
    assert len(INVALID_NAMES["too-long"]) == 256


@pytest.mark.parametrize("case", list(INVALID_NAMES))
async def test_invalid_repository_name_is_name_invalid(node, case):
    name = INVALID_NAMES[case]
    image = build_image("names")
    blob = random_layer("names-blob")

    def run():
        results = {}
        results["post-upload"] = raw_request(
            node.url, "POST", f"/v2/{name}/blobs/uploads/?digest={digest(blob)}", blob,
            {"Content-Type": "application/octet-stream"})
        results["put-manifest"] = raw_request(
            node.url, "PUT", f"/v2/{name}/manifests/latest", image.manifest,
            {"Content-Type": image.media_type})
        results["get-manifest"] = raw_request(node.url, "GET", f"/v2/{name}/manifests/latest")
        results["tags"] = raw_request(node.url, "GET", f"/v2/{name}/tags/list")
        return results

    results = await anyio.to_thread.run_sync(run)
    for op in ("post-upload", "put-manifest"):
        status, headers, body = results[op]
        # writes with an invalid name: 400 NAME_INVALID
        assert (status, raw_error_codes(body)[:1]) == (400, ["NAME_INVALID"]), (op, name, status, body)
    for op in ("get-manifest", "tags"):
        status, headers, body = results[op]
        # reads: NAME_INVALID, or a plain 404 (a name that cannot exist is unknown)
        assert status in (400, 404), (op, name, status, body)
        if status == 400:
            assert raw_error_codes(body)[:1] == ["NAME_INVALID"], (op, name, status, body)


@pytest.mark.parametrize("name", [
    "a" * 255,
    "/".join(["abcdefgh"] * 28) + "/abc",
    "a.b-c_d/e__f/g---h/0/9z",
])
async def test_valid_unusual_names_work(client, name):
    name = name[:-8] + uuid.uuid4().hex[:8] if len(name) >= 255 else name + "-" + uuid.uuid4().hex[:6]
    assert len(name) <= 255
    image = build_image("valid-names", layers=1)
    await push_image(client, name, "v1", image)
    assert_manifest_response(await client.get(f"/v2/{name}/manifests/v1", headers=ACCEPT), image)


# -- path traversal ---------------------------------------------------------------------------------
def _all_paths(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            yield os.path.join(dirpath, n)


async def test_traversal_attempts_are_refused_and_create_nothing(node, tmp_path_factory):
    if node.data_dir is None:
        pytest.skip("needs a local node")
    marker = f"escape{uuid.uuid4().hex[:10]}"
    blob = b"traversal payload"
    d = digest(blob)
    image = build_image("traversal", layers=1)
    attempts = [
        ("PUT", f"/v2/%2e%2e/%2e%2e/{marker}/manifests/latest", image.manifest),
        ("PUT", f"/v2/..%2f..%2f{marker}/manifests/latest", image.manifest),
        ("PUT", f"/v2/ok/../../{marker}/manifests/latest", image.manifest),
        ("POST", f"/v2/%2e%2e/{marker}/blobs/uploads/?digest={d}", blob),
        ("POST", f"/v2/ok/..%2F{marker}/blobs/uploads/?digest={d}", blob),
        ("GET", f"/v2/ok/blobs/sha256:..%2f..%2f..%2f{marker}", b""),
        ("GET", f"/v2/ok/blobs/sha256%3A..%2F..%2F{marker}", b""),
        ("GET", f"/v2/ok/manifests/sha256:..%2f..%2f{marker}", b""),
        ("PUT", f"/v2/ok/manifests/..%2f..%2f{marker}", image.manifest),
        ("PATCH", f"/v2/ok/blobs/uploads/..%2f..%2f{marker}", blob),
        ("PATCH", f"/v2/ok/blobs/uploads/%2e%2e%2f%2e%2e%2f{marker}", blob),
        ("PUT", f"/v2/ok/blobs/uploads/..%2f..%2f..%2f{marker}?digest={d}", blob),
        ("GET", f"/v2/ok/blobs/uploads/..%2f..%2f..%2f..%2f{marker}", b""),
        ("DELETE", f"/v2/ok/blobs/uploads/..%2f..%2f{marker}", b""),
        ("GET", f"/v2/ok/blobs/uploads/../../../../../../etc/passwd", b""),
    ]

    def run():
        out = []
        for method, path, body in attempts:
            headers = {"Content-Type": image.media_type if "manifests" in path else "application/octet-stream"}
            if method == "PATCH":
                headers["Content-Range"] = f"0-{len(body) - 1}"
            out.append((method, path, *raw_request(node.url, method, path, body, headers)))
        return out

    for method, path, status, headers, body in await anyio.to_thread.run_sync(run):
        assert status in (400, 404), (method, path, status, body)
        assert b"root:" not in body, (method, path, body)

    # nothing named after the marker anywhere under the test temp dirs, nor directly in
    # any directory above the node's data dir (where a "../" walk would land)
    leaked = [p for p in _all_paths(Path(tmp_path_factory.getbasetemp())) if marker in p]
    for ancestor in Path(node.data_dir).resolve().parents:
        leaked += [str(ancestor / n) for n in os.listdir(ancestor) if marker in n]
    assert leaked == []


# -- more push rules -----------------------------------------------------------------------------------
async def test_content_type_parameters_are_ignored(client, repo):
    image = build_image("ctype-params")
    await push_content(client, repo, image)
    # "Registries SHOULD ignore any parameters if they are present."
    r = await push_manifest(client, repo, "v1", image.manifest, image.media_type + "; charset=utf-8")
    assert r.status_code == 201, describe(r)
    assert_manifest_response(await client.get(f"/v2/{repo}/manifests/v1", headers=ACCEPT), image)


async def test_manifest_without_media_type_field(client, repo):
    base = build_image("no-media-type-field")
    doc = base.json
    del doc["mediaType"]  # optional in an OCI image manifest ("SHOULD" be present)
    image = Image(canonical_json(doc), OCI_MANIFEST, base.blobs)
    await push_content(client, repo, image)
    r = await push_manifest(client, repo, "v1", image.manifest, OCI_MANIFEST)
    assert r.status_code == 201, describe(r)
    assert_manifest_response(await client.get(f"/v2/{repo}/manifests/v1", headers=ACCEPT), image)


async def test_manifest_referring_to_deleted_blob_is_refused(client, repo):
    await make_repo_exist(client, repo)
    image = build_image("deleted-blob")
    await push_content(client, repo, image)
    layer = image.json["layers"][0]["digest"]
    r = await client.delete(f"/v2/{repo}/blobs/{layer}")
    assert r.status_code == 202, describe(r)
    r = await push_manifest(client, repo, "v1", image.manifest, image.media_type)
    assert r.status_code == 400, describe(r)
    assert set(error_codes(r)) == {"MANIFEST_BLOB_UNKNOWN"}, describe(r)
    await assert_manifest_absent(client, repo, "v1")


async def test_manifest_blobs_must_be_in_the_repository_or_mountable(client, repo):
    """Blobs pushed to another repository: the registry may accept the manifest (global
    content store) but then every blob must be pullable through this repository."""
    image = build_image("other-repo-blobs")
    await push_content(client, repo + "-elsewhere", image)
    await make_repo_exist(client, repo)
    r = await push_manifest(client, repo, "v1", image.manifest, image.media_type)
    if r.status_code == 201:
        for d, data in image.blobs.items():
            b = await client.get(f"/v2/{repo}/blobs/{d}")
            assert b.status_code == 200 and b.content == data, describe(b)
    else:
        assert r.status_code == 400, describe(r)
        assert set(error_codes(r)) == {"MANIFEST_BLOB_UNKNOWN"}, describe(r)


async def test_head_of_unknown_manifest_has_no_body(client, repo):
    await make_repo_exist(client, repo)
    r = await client.head(f"/v2/{repo}/manifests/absent")
    assert r.status_code == 404, describe(r)
    assert r.content == b""


async def test_docker_manifest_pulled_with_docker_accept(client, repo):
    image = build_image("docker-accept", fmt="docker")
    await push_image(client, repo, "v1", image)
    r = await client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
    assert_manifest_response(r, image)
    lst = build_index("docker-accept-list", fmt="docker")
    await push_image(client, repo, "list", lst)
    r = await client.get(f"/v2/{repo}/manifests/list",
                         headers={"Accept": f"{DOCKER_LIST}, {DOCKER_MANIFEST}"})
    assert_manifest_response(r, lst)


async def test_manifest_with_many_layers_is_one_transaction(client, repo):
    """200 layers: more operations than etcd's default --max-txn-ops (128) allows in one txn."""
    from tests.support import oci
    layers = [oci.random_bytes(64, seed=f"many-{i}") for i in range(200)]
    for layer in layers:
        await oci.push_blob(client, repo, layer)
    config = b'{"architecture":"amd64","os":"linux"}'
    await oci.push_blob(client, repo, config)
    body = oci.oci_manifest(config, layers)
    r = await oci.push_manifest(client, repo, "many", body, oci.OCI_MANIFEST)
    assert r.status_code == 201, oci.describe(r)
    r = await client.get(f"/v2/{repo}/manifests/many", headers={"Accept": oci.OCI_MANIFEST})
    assert r.status_code == 200 and r.content == body
