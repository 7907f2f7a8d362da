"""An upload session belongs to the account that opened it (issue 12, item 14): another account
with push on the same repository can neither read, append to, complete nor cancel it."""

from __future__ import annotations

import hashlib

import pytest

from tests.support.oci import describe, error_codes

pytestmark = pytest.mark.anyio


async def test_another_account_cannot_touch_an_upload_session(secured):
    repo = "team/upload-binding"
    data = b"only alice may finish this" * 100
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with secured.client("alice") as alice, secured.client("robot$ci") as ci:
        r = await alice.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, describe(r)
        location = r.headers["Location"]
        r = await alice.patch(location, content=data[:100], headers={"Content-Range": "0-99"})
        assert r.status_code == 202, describe(r)

        # robot$ci may push to team/**, but this session is alice's.
        attempts = [lambda: ci.get(location),
                    lambda: ci.patch(location, content=data[100:], headers={"Content-Range": "100-2599"}),
                    lambda: ci.put(location, params={"digest": digest}, content=data[100:]),
                    lambda: ci.delete(location)]
        for attempt in attempts:
            r = await attempt()
            assert r.status_code == 404 and error_codes(r) == ["BLOB_UPLOAD_UNKNOWN"], describe(r)

        r = await alice.get(location)
        assert r.status_code == 204 and r.headers["Range"] == "0-99", describe(r)   # untouched
        r = await alice.put(location, params={"digest": digest}, content=data[100:])
        assert r.status_code == 201, describe(r)
        r = await ci.get(f"/v2/{repo}/blobs/{digest}")
        assert r.status_code == 200 and r.content == data
