"""Path traversal and header injection through names, references, scopes, the Host and
Authorization headers: every one gets a 4xx (never 500), and nothing lands in a header or the
audit log that the client put there."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

import httpx
import pytest

from tests.auth.conftest import parse_challenge
from tests.support.oci import build_image, push_image, raw_error_codes, raw_request

pytestmark = pytest.mark.anyio

ALICE = "Basic " + base64.b64encode(b"alice:alice-password").decode()
TRAVERSALS = [
    "/v2/team/../../admin/manifests/latest",
    "/v2/team/%2e%2e/x/manifests/latest",
    "/v2/team/app/manifests/..%2f..%2fetc%2fpasswd",
    "/v2/team/app/manifests/../../../etc/passwd",
    "/v2/team/app/blobs/sha256:..%2f..%2fetc%2fpasswd",
    "/v2/team/app/blobs/uploads/..%2f..%2fnode-id",
    "/v2/team/app/referrers/sha256:../../x",
    "/v2/..%2fteam/app/tags/list",
    "/v2//team/app/tags/list",
    "/v2/team/app%00/tags/list",
]


@pytest.mark.parametrize("path", TRAVERSALS)
@pytest.mark.parametrize("as_alice", [False, True], ids=["anonymous", "alice"])
def test_traversal_in_names_and_references(secured, path, as_alice):
    headers = {"Authorization": ALICE} if as_alice else {}
    for method in ("GET", "PUT", "DELETE"):
        status, response_headers, body = raw_request(secured.url, method, path, b"{}", headers)
        assert 400 <= status < 500, (method, path, status, body)
        assert status != 200 and b"root:" not in body
        codes = raw_error_codes(body)
        assert codes and set(codes) <= {"NAME_INVALID", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "DIGEST_INVALID",
                                        "BLOB_UPLOAD_UNKNOWN", "UNSUPPORTED", "UNAUTHORIZED", "DENIED"}, \
            (method, path, body)


@pytest.mark.parametrize("scope", [
    "repository:../../etc:pull",
    "repository:team/a:pull\r\nX-Injected: 1",
    'repository:team/a:pull",error="x',
    "repository:team/a/../../b:pull",
    "repository:team/a:pull\x00",
    "registry:catalog:*\r\nSet-Cookie: a=b",
])
def test_scope_injection_is_refused(secured, scope):
    path = "/token?service=" + quote(secured.service) + "&scope=" + quote(scope)
    status, headers, body = raw_request(secured.url, "GET", path, headers={"Authorization": ALICE})
    assert status == 400, (scope, status, body)
    assert "x-injected" not in headers and "set-cookie" not in headers


def test_service_and_host_injection(secured):
    status, headers, _ = raw_request(secured.url, "GET", "/token?service=" + quote('x"\r\nSet-Cookie: a=b'))
    assert status == 400 and "set-cookie" not in headers
    for host in ('evil.example",error="x', "evil.example\tx", "a b", "x" * 300):
        status, headers, _ = raw_request(secured.url, "GET", "/v2/", headers={"Host": host})
        assert status in (400, 401)
        if status == 401:
            challenge = parse_challenge(headers["www-authenticate"])
            assert challenge == {"realm": f"{secured.url}/token", "service": secured.service}, headers


@pytest.mark.parametrize("header", [
    "Basic %%%", "Basic " + base64.b64encode(b"\xff\xfe:pw").decode(), "Bearer a b", "Bearer " + "a" * 9000,
    "Negotiate abc", "Basic", "Bearer", "Bearer " + base64.b64encode(b'{"alg":"none"}').decode() + "..",
    "Basic " + base64.b64encode(b"al\r\nice:pw").decode(), "Basic " + base64.b64encode(b"../../etc:pw").decode(),
])
def test_bad_authorization_headers_are_401(secured, header):
    status, headers, body = raw_request(secured.url, "GET", "/v2/team/app/tags/list", headers={"Authorization": header})
    assert status == 401 and raw_error_codes(body) == ["UNAUTHORIZED"], (header, status, body)


async def test_audit_lines_stay_lines_and_odd_numbers_are_400(secured):
    async with httpx.AsyncClient(base_url=secured.url, auth=("alice", "alice-password")) as alice:
        await push_image(alice, "team/odd", "latest", build_image("odd"))
        for query in ("n=%C2%B2", "n=%D9%A3", "n=-1", "n=1e3"):
            r = await alice.get(f"/v2/_catalog?{query}")
            assert r.status_code == 400, (query, r.text)
        r = await alice.get("/v2/team/odd/tags/list?n=%C2%B2")
        assert r.status_code == 400
    lines = secured.audit_log.read_bytes().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    assert any(json.loads(line).get("account") == "al\r\nice" for line in lines)
