"""Failed logins are limited per account and per client address: 429 TOOMANYREQUESTS with
Retry-After, even for the right password, on /token (GET and the OAuth2 POST) and Basic on /v2/."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.auth.conftest import start_secured
from tests.support.oci import describe, error_codes

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def limited(tmp_path_factory, etcd, cluster_name):
    s = start_secured(tmp_path_factory, etcd, cluster_name, "--login-rate", "3/60", "--login-rate-client", "8/60")
    try:
        yield s
    finally:
        s.node.stop()


def assert_limited(r: httpx.Response) -> None:
    assert r.status_code == 429, describe(r)
    assert error_codes(r) == ["TOOMANYREQUESTS"]
    assert 1 <= int(r.headers["retry-after"]) <= 60


async def test_failed_logins_are_limited_per_account_then_per_client(limited):
    async with httpx.AsyncClient(base_url=limited.url) as c:
        async def token(user: str, password: str) -> httpx.Response:
            return await c.get("/token", params={"scope": "repository:team/a:pull"}, auth=(user, password))

        assert (await token("bob", "bob-password")).status_code == 200          # bob logged in before the attack
        for _ in range(3):
            assert (await token("alice", "guess")).status_code == 401
        assert_limited(await token("alice", "alice-password"))                  # even the right password
        assert_limited(await c.get("/v2/", auth=("alice", "alice-password")))   # Basic on /v2/ too
        assert_limited(await c.post("/token", data={"grant_type": "password", "username": "alice",
                                                    "password": "alice-password"}))
        assert (await token("reader", "reader-password")).status_code == 200    # other accounts: fine so far

        for i in range(5):                                                      # 3 + 5 = 8 failures from here
            assert (await token(f"nobody{i}", "guess")).status_code == 401
        assert_limited(await token("admin", "admin-password"))                  # this client is limited now
        assert_limited(await c.get("/v2/", auth=("nobody-else", "x")))
        # Credentials this node verified before the attack keep working (they are not guessed).
        assert (await c.get("/v2/", auth=("bob", "bob-password"))).status_code == 200
        # Bearer tokens are not logins: they are not limited.
        good = (await c.get("/token", params={"scope": "repository:team/a:pull"},
                            auth=("bob", "bob-password"))).json()["token"]
        assert (await c.get("/v2/", headers={"Authorization": f"Bearer {good}"})).status_code == 200

    events = [json.loads(line) for line in limited.audit_log.read_text().splitlines()]
    failures = [e for e in events if e["event"] == "login_failed"]
    assert sum(e.get("reason") == "rate limited" for e in failures) >= 4
    assert {e["account"] for e in failures} >= {"alice", "nobody0", "admin"}
