"""API version check (`GET /v2/`) and routing."""

import pytest

from tests.support.oci import describe

pytestmark = pytest.mark.anyio


async def test_v2_base_answers_200_with_api_version_header(client):
    r = await client.get("/v2/")
    assert r.status_code == 200, describe(r)
    # spec: the "Docker-Distribution-API-Version" header SHOULD be set to "registry/2.0"
    assert r.headers.get("Docker-Distribution-API-Version") == "registry/2.0", describe(r)


async def test_v2_base_without_trailing_slash(client):
    r = await client.get("/v2")
    # Either served directly or redirected to /v2/ -- never an error.
    assert r.status_code in (200, 301, 307, 308), describe(r)
    if r.status_code != 200:
        assert r.headers["Location"].endswith("/v2/")


async def test_head_v2_base(client):
    r = await client.head("/v2/")
    assert r.status_code == 200, describe(r)
    assert r.content == b""


@pytest.mark.parametrize("path", [
    "/v1/",
    "/v3/",
    "/nothing-here",
    "/v2/some/repo/unknown-endpoint/x",
    "/v2/some/repo/blobs",
])
async def test_unknown_routes_are_404(client, path):
    r = await client.get(path)
    assert r.status_code == 404, describe(r)


# The v1.1 spec: "A 4XX response code from the registry MAY return a body in any format.
# If the response body is in JSON format, it MUST have the following format ... The code
# field MUST be one of the following:"
SPEC_ERROR_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
}


async def test_4xx_json_bodies_use_only_spec_error_codes(client):
    import json as _json

    from tests.support.oci import build_image, digest, push_blob, push_image

    repo = "base/error-codes"
    blob = b"0123456789" * 10
    d = await push_blob(client, repo, blob)
    await push_image(client, repo, "v1", build_image("error-codes", layers=1))
    up = await client.post(f"/v2/{repo}/blobs/uploads/")
    loc = up.headers["Location"]
    requests = [
        ("GET", "/nothing-here", {}, b""),
        ("GET", f"/v2/{repo}/unknown-endpoint", {}, b""),
        ("GET", f"/v2/{repo}/blobs/{digest(b'x')}", {}, b""),
        ("GET", f"/v2/{repo}/blobs/{d}", {"Range": "bytes=500-600"}, b""),
        ("GET", f"/v2/{repo}/blobs/{d}", {"Range": "bytes=0-1,4-5"}, b""),
        ("GET", f"/v2/{repo}/blobs/{d}", {"Range": "lines=1-2"}, b""),
        ("GET", f"/v2/{repo}/manifests/absent", {}, b""),
        ("GET", f"/v2/{repo}-absent/tags/list", {}, b""),
        ("GET", f"/v2/{repo}/tags/list?n=-1", {}, b""),
        ("GET", f"/v2/{repo}/tags/list?n=abc", {}, b""),
        ("GET", "/v2/_catalog?n=abc", {}, b""),
        ("GET", f"/v2/{repo}/referrers/not-a-digest", {}, b""),
        ("PUT", f"/v2/{repo}/manifests/-bad-tag", {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, b"{}"),
        ("PUT", f"/v2/{repo}/manifests/v2", {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, b"{"),
        ("PUT", f"/v2/Bad/manifests/v2", {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, b"{}"),
        ("POST", f"/v2/{repo}/blobs/uploads/?digest=sha256:12", {}, b"x"),
        ("PATCH", loc, {"Content-Range": "7-9"}, b"abc"),
        ("PATCH", loc, {"Content-Range": "bogus"}, b"abc"),
        ("PUT", loc, {}, b"abc"),
        ("GET", f"/v2/{repo}/blobs/uploads/{'0' * 32}", {}, b""),
        ("DELETE", f"/v2/{repo}/manifests/{digest(b'none')}", {}, b""),
        ("DELETE", f"/v2/{repo}/blobs/{digest(b'none')}", {}, b""),
    ]
    bad = []
    for method, path, headers, body in requests:
        r = await client.request(method, path, headers=headers, content=body)
        if not (400 <= r.status_code < 500) or not r.content:
            continue
        try:
            doc = _json.loads(r.content)
        except ValueError:
            continue  # "MAY return a body in any format"
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if not isinstance(errors, list) or not errors:
            bad.append((method, path, r.status_code, "JSON body without an errors list", r.text))
            continue
        for e in errors:
            if e.get("code") not in SPEC_ERROR_CODES:
                bad.append((method, path, r.status_code, e.get("code"), r.text))
    assert bad == [], "\n".join(map(repr, bad))


async def test_multi_range_request_is_served_or_ignored(client):
    """RFC 9110: a server MAY ignore Range (200 with the whole blob) or answer 206; two
    satisfiable ranges are not grounds for 416."""
    from tests.support.oci import push_blob

    data = bytes(range(256)) * 4
    d = await push_blob(client, "base/multi-range", data)
    r = await client.get(f"/v2/base/multi-range/blobs/{d}", headers={"Range": "bytes=0-1,4-5"})
    assert r.status_code in (200, 206), describe(r)
    if r.status_code == 200:
        assert r.content == data
