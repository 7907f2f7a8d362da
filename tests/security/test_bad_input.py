"""Issue 12, items 10, 11 and 16 over HTTP, on both server runtimes: input that answered 500,
paths that forged access log lines, and refused manifests whose bytes stayed on disk."""

from __future__ import annotations

import json

import anyio
import pytest

from tests.support.oci import (
    OCI_MANIFEST, digest, error_codes, oci_manifest, push_blob, random_bytes, raw_request,
)

pytestmark = pytest.mark.anyio

HUGE = "9" * 4400       # past Python's 4,300-digit int() limit


async def test_deeply_nested_manifest_is_manifest_invalid(client, repo):
    body = b'{"schemaVersion": 2, "layers": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = await client.put(f"/v2/{repo}/manifests/v1", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and error_codes(r) == ["MANIFEST_INVALID"]


async def test_ranges_with_thousands_of_digits(client, repo):
    data = random_bytes(1000, "range")
    blob = await push_blob(client, repo, data)
    r = await client.get(f"/v2/{repo}/blobs/{blob}", headers={"Range": f"bytes={HUGE}-"})
    assert r.status_code == 416 and r.headers["content-range"] == "bytes */1000"
    r = await client.get(f"/v2/{repo}/blobs/{blob}", headers={"Range": f"bytes=990-{HUGE}"})
    assert r.status_code == 206 and r.content == data[990:]
    r = await client.get(f"/v2/{repo}/blobs/{blob}", headers={"Range": f"bytes=-{HUGE}"})
    assert r.status_code == 206 and r.content == data


async def test_content_range_with_thousands_of_digits(client, repo):
    r = await client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202
    location = r.headers["location"]
    for content_range in (f"0-{HUGE}", f"{HUGE}-{HUGE}"):
        r = await client.patch(location, content=b"abc", headers={"Content-Range": content_range})
        assert r.status_code == 416, r.text


def _log_lines(node) -> list[str]:
    return node.log_path.read_text(errors="replace").splitlines()


async def test_control_characters_in_paths_cannot_forge_log_lines(node, client):
    if node.runtime == "external":
        pytest.skip("reads the node's log")
    path = "/v2/a%0d%0aFORGED%20200%00/tags/list"
    status, _, _ = await anyio.to_thread.run_sync(raw_request, node.url, "GET", path)
    assert status in (400, 404)
    for _ in range(50):
        lines = [line for line in _log_lines(node) if "FORGED" in line]
        if lines:
            break
        await anyio.sleep(0.1)
    assert lines and all("GET /v2/a\\x0d\\x0aFORGED 200\\x00/tags/list" in line for line in lines), lines


async def test_a_manifest_refused_for_unknown_blobs_leaves_no_bytes(node, client, repo):
    if node.runtime == "external":
        pytest.skip("looks into the node's blob store")
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": repo}).encode()
    body = oci_manifest(config, [random_bytes(64, repo)])
    r = await client.put(f"/v2/{repo}/manifests/v1", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and error_codes(r) == ["MANIFEST_BLOB_UNKNOWN"]
    hex_digest = digest(body).split(":")[1]
    assert not list(node.data_dir.rglob(hex_digest)), "the refused manifest's bytes stayed in the blob store"
