"""Blobs and blob uploads (OCI Distribution Spec v1.1, push and pull workflows).

Spec statements these tests hold the registry to (distribution-spec v1.1 spec.md):
* monolithic POST ?digest= / POST then PUT: "MUST return a 201 Created and MUST include
  ... Location: <blob-location>";
* chunked PATCH: "The response for each successful chunk upload MUST be 202 Accepted,
  and MUST have the following headers: Location: <location>, Range: 0-<end-of-range>";
  "If a chunk is uploaded out of order, the registry MUST respond with a 416";
* GET on an upload: "MUST be a 204 No Content ... MUST have ... Location, Range";
* DELETE on an upload: "SHOULD be a 204 No Content";
* blob GET/HEAD: 200, Docker-Content-Digest matching the body, Content-Length;
  404 when unknown; Range per RFC 9110 (206 / 416);
* blob DELETE: "MUST respond with code 202 Accepted. If the blob is not found, a 404";
* mount: 201 + Location when mounted, otherwise "SHOULD return a 202" (upload session).
"""

from __future__ import annotations

import hashlib
import uuid

import httpx
import pytest

from tests.support.oci import describe, digest, error_codes, push_blob, random_bytes, with_query

pytestmark = pytest.mark.anyio

OCTET = {"Content-Type": "application/octet-stream"}


# -- helpers ---------------------------------------------------------------------------
async def start_upload(client: httpx.AsyncClient, repo: str) -> str:
    r = await client.post(f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    assert r.status_code == 202, describe(r)
    assert r.headers.get("Location"), describe(r)
    return r.headers["Location"]


async def patch_chunk(client, location: str, data: bytes, start: int) -> httpx.Response:
    return await client.patch(
        location, content=data,
        headers={**OCTET, "Content-Range": f"{start}-{start + len(data) - 1}"},
    )


def assert_blob_headers(r: httpx.Response, data: bytes, d: str | None = None) -> None:
    assert r.status_code == 200, describe(r)
    assert int(r.headers["Content-Length"]) == len(data), describe(r)
    served = r.headers.get("Docker-Content-Digest")
    assert served is not None, describe(r)
    # "If present, the value of this header MUST be a digest matching that of the response body"
    algo = served.split(":", 1)[0]
    assert served == digest(data, algo), describe(r)
    if d is not None and d.startswith("sha256:"):
        assert served == d
    assert r.headers.get("Content-Type", "").split(";")[0] == "application/octet-stream", describe(r)


async def assert_blob_absent(client, repo: str, d: str) -> None:
    r = await client.head(f"/v2/{repo}/blobs/{d}")
    assert r.status_code == 404, describe(r)
    r = await client.get(f"/v2/{repo}/blobs/{d}")
    assert r.status_code == 404, describe(r)
    assert error_codes(r) == ["BLOB_UNKNOWN"], describe(r)


async def assert_blob_content(client, repo: str, d: str, data: bytes) -> None:
    r = await client.get(f"/v2/{repo}/blobs/{d}")
    assert_blob_headers(r, data, d)
    assert r.content == data


# -- monolithic --------------------------------------------------------------------------
async def test_monolithic_post_with_digest(client, repo):
    data = random_bytes(10_000, "mono")
    d = digest(data)
    r = await client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": d}, content=data,
                          headers=OCTET)
    assert r.status_code == 201, describe(r)
    assert r.headers.get("Docker-Content-Digest") == d, describe(r)
    location = r.headers.get("Location")
    assert location, describe(r)
    # "<blob-location> is a pullable blob URL"
    got = await client.get(location)
    assert got.status_code == 200, describe(got)
    assert got.content == data
    await assert_blob_content(client, repo, d, data)


async def test_post_then_put(client, repo):
    data = random_bytes(5_000, "post-put")
    d = digest(data)
    location = await start_upload(client, repo)
    r = await client.put(with_query(location, digest=d), content=data, headers=OCTET)
    assert r.status_code == 201, describe(r)
    assert r.headers.get("Docker-Content-Digest") == d, describe(r)
    assert (await client.get(r.headers["Location"])).content == data
    await assert_blob_content(client, repo, d, data)
    # the session is closed once the upload completed
    r = await client.get(location)
    assert r.status_code == 404, describe(r)
    assert error_codes(r) == ["BLOB_UPLOAD_UNKNOWN"], describe(r)


async def test_empty_blob(client, repo):
    d = await push_blob(client, repo, b"")
    assert d == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    r = await client.get(f"/v2/{repo}/blobs/{d}")
    assert r.status_code == 200, describe(r)
    assert r.content == b""
    assert r.headers["Content-Length"] == "0"


async def test_head_blob_has_no_body_and_right_headers(client, repo):
    data = random_bytes(3_333, "head")
    d = await push_blob(client, repo, data)
    r = await client.head(f"/v2/{repo}/blobs/{d}")
    assert_blob_headers(r, data, d)
    assert r.content == b""


async def test_unknown_blob_is_404_blob_unknown(client, repo):
    await push_blob(client, repo, b"something so the repository exists")
    await assert_blob_absent(client, repo, digest(b"never pushed"))


# -- chunked -------------------------------------------------------------------------------
async def test_chunked_upload_with_patch(client, repo):
    data = random_bytes(70_000, "chunked")
    d = digest(data)
    parts = [data[:30_000], data[30_000:65_000], data[65_000:]]
    location = await start_upload(client, repo)
    offset = 0
    for part in parts:
        r = await patch_chunk(client, location, part, offset)
        assert r.status_code == 202, describe(r)
        offset += len(part)
        # "Range: 0-<end-of-range>" where end is the last uploaded byte
        assert r.headers.get("Range") == f"0-{offset - 1}", describe(r)
        assert r.headers.get("Location"), describe(r)
        assert r.headers.get("Docker-Upload-UUID"), describe(r)
        location = r.headers["Location"]
        # GET on the upload: 204 + Location + Range
        st = await client.get(location)
        assert st.status_code == 204, describe(st)
        assert st.headers.get("Range") == f"0-{offset - 1}", describe(st)
        assert st.headers.get("Location"), describe(st)
        location = st.headers["Location"]
    r = await client.put(with_query(location, digest=d), headers={"Content-Length": "0"})
    assert r.status_code == 201, describe(r)
    assert r.headers.get("Docker-Content-Digest") == d, describe(r)
    assert r.headers.get("Location"), describe(r)
    await assert_blob_content(client, repo, d, data)


async def test_chunked_upload_uuid_header_matches_location(client, repo):
    location = await start_upload(client, repo)
    r = await patch_chunk(client, location, b"abc", 0)
    assert r.status_code == 202, describe(r)
    upload_id = r.headers.get("Docker-Upload-UUID")
    assert upload_id, describe(r)
    assert upload_id in r.headers["Location"], describe(r)


async def test_final_chunk_in_closing_put(client, repo):
    data = random_bytes(20_000, "final-put")
    d = digest(data)
    location = await start_upload(client, repo)
    r = await patch_chunk(client, location, data[:12_000], 0)
    assert r.status_code == 202, describe(r)
    location = r.headers["Location"]
    r = await client.put(with_query(location, digest=d), content=data[12_000:],
                         headers={**OCTET, "Content-Range": f"12000-{len(data) - 1}"})
    assert r.status_code == 201, describe(r)
    await assert_blob_content(client, repo, d, data)


async def test_delete_upload(client, repo):
    location = await start_upload(client, repo)
    r = await patch_chunk(client, location, b"x" * 100, 0)
    assert r.status_code == 202, describe(r)
    location = r.headers["Location"]
    r = await client.delete(location)
    assert r.status_code == 204, describe(r)
    for method in ("GET", "PATCH", "DELETE"):
        r = await client.request(method, location, content=b"" if method != "PATCH" else b"y",
                                 headers={"Content-Range": "100-100"} if method == "PATCH" else {})
        assert r.status_code == 404, describe(r)
        assert error_codes(r) == ["BLOB_UPLOAD_UNKNOWN"], describe(r)
    r = await client.put(with_query(location, digest=digest(b"x" * 100)))
    assert r.status_code == 404, describe(r)
    assert error_codes(r) == ["BLOB_UPLOAD_UNKNOWN"], describe(r)
    await assert_blob_absent(client, repo, digest(b"x" * 100))


@pytest.mark.parametrize("bad_start", [0, 50, 101, 200], ids=["restart", "overlap", "gap", "far"])
async def test_out_of_order_chunk_is_416(client, repo, bad_start):
    data = random_bytes(300, f"ooo-{bad_start}")
    location = await start_upload(client, repo)
    r = await patch_chunk(client, location, data[:100], 0)
    assert r.status_code == 202, describe(r)
    location = r.headers["Location"]
    r = await patch_chunk(client, location, data[bad_start:bad_start + 100], bad_start)
    assert r.status_code == 416, describe(r)
    # the upload is still usable and unchanged: resume from the last valid range
    st = await client.get(location)
    assert st.status_code == 204, describe(st)
    assert st.headers.get("Range") == "0-99", describe(st)
    r = await patch_chunk(client, st.headers["Location"], data[100:], 100)
    assert r.status_code == 202, describe(r)
    assert r.headers.get("Range") == f"0-{len(data) - 1}", describe(r)
    r = await client.put(with_query(r.headers["Location"], digest=digest(data)))
    assert r.status_code == 201, describe(r)
    await assert_blob_content(client, repo, digest(data), data)


async def test_out_of_order_final_chunk_in_put_is_416(client, repo):
    data = random_bytes(300, "ooo-put")
    location = await start_upload(client, repo)
    r = await patch_chunk(client, location, data[:100], 0)
    assert r.status_code == 202, describe(r)
    location = r.headers["Location"]
    r = await client.put(with_query(location, digest=digest(data)), content=data[150:],
                         headers={**OCTET, "Content-Range": f"150-{len(data) - 1}"})
    assert r.status_code == 416, describe(r)
    await assert_blob_absent(client, repo, digest(data))


async def test_first_chunk_must_start_at_zero(client, repo):
    location = await start_upload(client, repo)
    r = await patch_chunk(client, location, b"z" * 10, 5)
    assert r.status_code == 416, describe(r)


@pytest.mark.parametrize("content_range", ["garbage", "-9", "0-", "a-9", "0-9-2", "9-0"])
async def test_bad_content_range_is_416(client, repo, content_range):
    location = await start_upload(client, repo)
    r = await client.patch(location, content=b"0123456789",
                           headers={**OCTET, "Content-Range": content_range})
    assert r.status_code == 416, describe(r)
    st = await client.get(location)
    assert st.status_code == 204, describe(st)
    # nothing was appended: a proper first chunk still starts at 0
    r = await patch_chunk(client, st.headers["Location"], b"0123456789", 0)
    assert r.status_code == 202, describe(r)
    assert r.headers.get("Range") == "0-9", describe(r)


async def test_content_range_length_mismatch_is_refused(client, repo):
    location = await start_upload(client, repo)
    r = await client.patch(location, content=b"0123456789",
                           headers={**OCTET, "Content-Range": "0-99"})
    assert r.status_code in (400, 416), describe(r)


async def test_unknown_upload_id_is_404(client, repo):
    await push_blob(client, repo, b"make the repository exist")
    base = f"/v2/{repo}/blobs/uploads/{uuid.uuid4()}"
    for method, kwargs in [
        ("GET", {}),
        ("PATCH", {"content": b"abc", "headers": {**OCTET, "Content-Range": "0-2"}}),
        ("PUT", {"content": b"abc", "params": {"digest": digest(b"abc")}}),
        ("DELETE", {}),
    ]:
        r = await client.request(method, base, **kwargs)
        assert r.status_code == 404, describe(r)
        assert error_codes(r) == ["BLOB_UPLOAD_UNKNOWN"], describe(r)
    await assert_blob_absent(client, repo, digest(b"abc"))


# -- digests -------------------------------------------------------------------------------
async def test_wrong_digest_on_put_is_digest_invalid_and_nothing_stored(client, repo):
    data = random_bytes(4_000, "wrong-digest")
    claimed = digest(b"something else entirely")
    location = await start_upload(client, repo)
    r = await client.put(with_query(location, digest=claimed), content=data, headers=OCTET)
    assert r.status_code == 400, describe(r)
    assert error_codes(r) == ["DIGEST_INVALID"], describe(r)
    await assert_blob_absent(client, repo, claimed)
    await assert_blob_absent(client, repo, digest(data))


async def test_wrong_digest_on_monolithic_post(client, repo):
    data = random_bytes(4_000, "wrong-digest-post")
    claimed = digest(b"not the data")
    r = await client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": claimed},
                          content=data, headers=OCTET)
    assert r.status_code == 400, describe(r)
    assert error_codes(r) == ["DIGEST_INVALID"], describe(r)
    await assert_blob_absent(client, repo, claimed)
    await assert_blob_absent(client, repo, digest(data))


async def test_wrong_digest_after_chunks(client, repo):
    data = random_bytes(9_000, "wrong-digest-chunks")
    location = await start_upload(client, repo)
    r = await patch_chunk(client, location, data, 0)
    assert r.status_code == 202, describe(r)
    claimed = digest(data + b"!")
    r = await client.put(with_query(r.headers["Location"], digest=claimed))
    assert r.status_code == 400, describe(r)
    assert error_codes(r) == ["DIGEST_INVALID"], describe(r)
    await assert_blob_absent(client, repo, claimed)


@pytest.mark.parametrize("bad", [
    "sha256:1234",
    "sha256:" + "g" * 64,
    "sha256" + "a" * 64,
    "sha256:" + "A" * 64,
    "sha256:../../../../etc/passwd",
    "",
])
async def test_malformed_digest_on_upload_is_400_digest_invalid(client, repo, bad):
    r = await client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": bad},
                          content=b"data", headers=OCTET)
    assert r.status_code == 400, describe(r)
    assert error_codes(r) == ["DIGEST_INVALID"], describe(r)
    location = await start_upload(client, repo)
    r = await client.put(with_query(location, digest=bad), content=b"data", headers=OCTET)
    assert r.status_code == 400, describe(r)
    assert error_codes(r) == ["DIGEST_INVALID"], describe(r)


async def test_put_without_digest_is_refused(client, repo):
    location = await start_upload(client, repo)
    r = await client.put(location, content=b"data", headers=OCTET)
    assert r.status_code == 400, describe(r)
    assert error_codes(r) and error_codes(r)[0] in ("DIGEST_INVALID", "BLOB_UPLOAD_INVALID"), describe(r)


async def test_sha512_digest(client, repo):
    data = random_bytes(12_345, "sha512")
    d = "sha512:" + hashlib.sha512(data).hexdigest()
    r = await client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": d}, content=data,
                          headers=OCTET)
    assert r.status_code == 201, describe(r)
    r = await client.get(f"/v2/{repo}/blobs/{d}")
    assert r.status_code == 200, describe(r)
    assert r.content == data
    served = r.headers.get("Docker-Content-Digest")
    assert served in (d, digest(data)), describe(r)
    r = await client.head(f"/v2/{repo}/blobs/{d}")
    assert r.status_code == 200, describe(r)
    assert int(r.headers["Content-Length"]) == len(data)


async def test_sha512_wrong_digest(client, repo):
    data = random_bytes(1_000, "sha512-wrong")
    d = "sha512:" + hashlib.sha512(b"other").hexdigest()
    r = await client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": d}, content=data,
                          headers=OCTET)
    assert r.status_code == 400, describe(r)
    assert error_codes(r) == ["DIGEST_INVALID"], describe(r)
    r = await client.head(f"/v2/{repo}/blobs/{d}")
    assert r.status_code == 404, describe(r)


# -- Range GET -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec,start,end", [
    ("bytes=0-0", 0, 0),
    ("bytes=10-19", 10, 19),
    ("bytes=990-", 990, 999),
    ("bytes=-5", 995, 999),
    ("bytes=500-5000", 500, 999),
])
async def test_range_get(client, repo, spec, start, end):
    data = random_bytes(1_000, "range")
    d = await push_blob(client, repo, data)
    r = await client.get(f"/v2/{repo}/blobs/{d}", headers={"Range": spec})
    assert r.status_code == 206, describe(r)
    assert r.headers.get("Content-Range") == f"bytes {start}-{end}/1000", describe(r)
    assert r.content == data[start:end + 1]
    assert int(r.headers["Content-Length"]) == end - start + 1


@pytest.mark.parametrize("spec", ["bytes=1000-", "bytes=1000-1000", "bytes=5000-6000"])
async def test_range_past_the_end_is_416(client, repo, spec):
    data = random_bytes(1_000, "range-416")
    d = await push_blob(client, repo, data)
    r = await client.get(f"/v2/{repo}/blobs/{d}", headers={"Range": spec})
    assert r.status_code == 416, describe(r)
    # RFC 9110 15.5.17: SHOULD send Content-Range with an unsatisfied-range value
    assert r.headers.get("Content-Range") == "bytes */1000", describe(r)


# -- DELETE ----------------------------------------------------------------------------------
async def test_delete_blob(client, repo):
    data = random_bytes(2_000, "delete")
    d = await push_blob(client, repo, data)
    r = await client.delete(f"/v2/{repo}/blobs/{d}")
    assert r.status_code == 202, describe(r)
    await assert_blob_absent(client, repo, d)
    r = await client.delete(f"/v2/{repo}/blobs/{d}")
    assert r.status_code == 404, describe(r)
    assert error_codes(r) == ["BLOB_UNKNOWN"], describe(r)


async def test_delete_unknown_blob_is_404(client, repo):
    await push_blob(client, repo, b"repo exists")
    r = await client.delete(f"/v2/{repo}/blobs/{digest(b'never')}")
    assert r.status_code == 404, describe(r)
    assert error_codes(r) == ["BLOB_UNKNOWN"], describe(r)


# -- cross-repository mount ------------------------------------------------------------------
async def test_mount_from_repo_with_blob_is_201(client, repo):
    data = random_bytes(6_000, "mount")
    d = await push_blob(client, repo, data)
    target = repo + "-mounted"
    r = await client.post(f"/v2/{target}/blobs/uploads/", params={"mount": d, "from": repo},
                          headers={"Content-Length": "0"})
    assert r.status_code == 201, describe(r)
    assert r.headers.get("Docker-Content-Digest") == d, describe(r)
    assert r.headers.get("Location"), describe(r)
    assert (await client.get(r.headers["Location"])).content == data
    await assert_blob_content(client, target, d, data)


async def test_mount_of_unknown_blob_falls_back_to_upload(client, repo):
    await push_blob(client, repo, b"source repo exists")
    data = random_bytes(1_500, "mount-unknown")
    d = digest(data)
    target = repo + "-target"
    r = await client.post(f"/v2/{target}/blobs/uploads/", params={"mount": d, "from": repo},
                          headers={"Content-Length": "0"})
    assert r.status_code == 202, describe(r)
    location = r.headers.get("Location")
    assert location, describe(r)
    await assert_blob_absent(client, target, d)
    # and the 202 is a real upload session
    r = await client.put(with_query(location, digest=d), content=data, headers=OCTET)
    assert r.status_code == 201, describe(r)
    await assert_blob_content(client, target, d, data)


async def test_mount_from_unknown_repo_falls_back_to_upload(client, repo):
    d = digest(b"nothing")
    r = await client.post(f"/v2/{repo}/blobs/uploads/",
                          params={"mount": d, "from": repo + "-does-not-exist"},
                          headers={"Content-Length": "0"})
    assert r.status_code == 202, describe(r)
    assert r.headers.get("Location"), describe(r)


async def test_mount_without_from(client, repo):
    data = random_bytes(800, "mount-no-from")
    d = await push_blob(client, repo, data)
    target = repo + "-nofrom"
    r = await client.post(f"/v2/{target}/blobs/uploads/", params={"mount": d},
                          headers={"Content-Length": "0"})
    # "The registry MAY treat the from parameter as optional, and it MAY cross-mount the
    # blob if it can be found." Otherwise a normal upload session.
    assert r.status_code in (201, 202), describe(r)
    assert r.headers.get("Location"), describe(r)
    if r.status_code == 201:
        await assert_blob_content(client, target, d, data)
    else:
        r = await client.put(with_query(r.headers["Location"], digest=d), content=data,
                             headers=OCTET)
        assert r.status_code == 201, describe(r)
        await assert_blob_content(client, target, d, data)


# -- resumable across a restart ----------------------------------------------------------------
async def test_upload_resumes_after_node_restart(client, repo, node):
    data = random_bytes(200_000, "resume")
    d = digest(data)
    location = await start_upload(client, repo)
    r = await patch_chunk(client, location, data[:120_000], 0)
    assert r.status_code == 202, describe(r)
    location = r.headers["Location"]

    await anyio_to_thread(node.restart)

    async with httpx.AsyncClient(base_url=node.url, timeout=30) as c2:
        st = await c2.get(location)
        assert st.status_code == 204, describe(st)
        assert st.headers.get("Range") == "0-119999", describe(st)
        r = await patch_chunk(c2, st.headers["Location"], data[120_000:], 120_000)
        assert r.status_code == 202, describe(r)
        assert r.headers.get("Range") == f"0-{len(data) - 1}", describe(r)
        r = await c2.put(with_query(r.headers["Location"], digest=d))
        assert r.status_code == 201, describe(r)
        await assert_blob_content(c2, repo, d, data)


async def anyio_to_thread(fn):
    import anyio

    return await anyio.to_thread.run_sync(fn)


# -- client compatibility and concurrency --------------------------------------------------------
async def test_streamed_patch_without_content_range(client, repo):
    """docker and containerd upload a layer as one PATCH without Content-Range (a
    "streamed" upload) and then PUT ?digest=; the registry has to accept that."""
    data = random_bytes(300_000, "streamed")
    d = digest(data)
    location = await start_upload(client, repo)
    r = await client.patch(location, content=data, headers=OCTET)
    assert r.status_code == 202, describe(r)
    assert r.headers.get("Range") == f"0-{len(data) - 1}", describe(r)
    r = await client.put(with_query(r.headers["Location"], digest=d))
    assert r.status_code == 201, describe(r)
    await assert_blob_content(client, repo, d, data)


async def test_each_upload_gets_its_own_session(client, repo):
    a = await start_upload(client, repo)
    b = await start_upload(client, repo)
    assert a != b
    r = await patch_chunk(client, a, b"aaaa", 0)
    assert r.status_code == 202, describe(r)
    st = await client.get(b)
    assert st.status_code == 204, describe(st)
    r = await patch_chunk(client, b, b"bb", 0)
    assert r.status_code == 202 and r.headers.get("Range") == "0-1", describe(r)


async def test_concurrent_uploads_of_the_same_blob(client, repo):
    import anyio

    data = random_bytes(2_000_000, "concurrent")
    d = digest(data)
    results = []

    async def one():
        results.append(await push_blob(client, repo, data))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
    assert results == [d] * 4
    await assert_blob_content(client, repo, d, data)


async def test_large_blob_round_trip(client, repo):
    data = random_bytes(24 * 1024 * 1024, "large")
    d = digest(data)
    location = await start_upload(client, repo)
    step = 5 * 1024 * 1024
    for off in range(0, len(data), step):
        r = await patch_chunk(client, location, data[off:off + step], off)
        assert r.status_code == 202, describe(r)
        location = r.headers["Location"]
    r = await client.put(with_query(location, digest=d))
    assert r.status_code == 201, describe(r)
    h = hashlib.sha256()
    async with client.stream("GET", f"/v2/{repo}/blobs/{d}") as resp:
        assert resp.status_code == 200
        assert int(resp.headers["Content-Length"]) == len(data)
        async for chunk in resp.aiter_bytes():
            h.update(chunk)
    assert "sha256:" + h.hexdigest() == d


async def test_range_with_unknown_unit_is_ignored(client, repo):
    """RFC 9110 14.2: "An origin server MUST ignore a Range header field that contains a
    range unit it does not understand." -> the whole blob, 200."""
    data = random_bytes(500, "range-unit")
    d = await push_blob(client, repo, data)
    r = await client.get(f"/v2/{repo}/blobs/{d}", headers={"Range": "lines=1-2"})
    assert r.status_code == 200, describe(r)
    assert r.content == data
