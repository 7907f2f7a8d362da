"""Issue 12, against real nodes (and one in-process AccessControl over the real etcd): tokens
cannot be traded at /token and die with a password change, unknown names cost a real bcrypt
check, the audit log records what it missed and survives a flood, X-Forwarded-For is believed
only from trusted proxies, and an account lock spares its owners and is lifted by
`cargohold user unlock`."""

from __future__ import annotations

import json

import anyio
import bcrypt
import httpx
import pytest

from cargohold.auth.ratelimit import FailureLimiter
from cargohold.coordinator.accounts import AccountStore
from cargohold.coordinator.etcd import EtcdClient
from cargohold.node import access as node_access
from cargohold.node.access import AccessControl
from cargohold.node.http import Request
from cargohold.oci.errors import RegistryError
from tests.auth.conftest import cli, provision, start_secured
from tests.support.poll import eventually
from tests.support.oci import build_image, describe, error_codes, push_blob, push_image, random_bytes

pytestmark = pytest.mark.anyio


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _wait_for_event(path, **fields) -> dict:
    """The newest audit event with these fields, once the node has written it."""
    found = await eventually(lambda: [e for e in _events(path) if all(e.get(k) == v for k, v in fields.items())],
                             what=f"an audit event {fields}")
    return found[-1]


async def _token(url: str, login: str, password: str, scope: str) -> str:
    async with httpx.AsyncClient(base_url=url) as c:
        r = await c.get("/token", params={"scope": scope}, auth=(login, password))
        assert r.status_code == 200, describe(r)
        return r.json()["token"]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------- item 1
async def test_a_token_cannot_be_traded_at_the_token_endpoint(secured):
    """The issue's repro: a pull-only token offered to /token for push and delete elsewhere."""
    pull_only = await _token(secured.url, "alice", "alice-password", "repository:team/a:pull")
    async with httpx.AsyncClient(base_url=secured.url) as c:
        r = await c.get("/token", params={"service": secured.service,
                                          "scope": "repository:team/other:pull,push,delete"},
                        headers=_bearer(pull_only))
        assert r.status_code == 401, describe(r)
        assert error_codes(r) == ["UNAUTHORIZED"] and "cannot be exchanged" in r.text
        assert r.headers["www-authenticate"].startswith("Basic ")
    await _wait_for_event(secured.audit_log, event="auth_failed", reason="token offered to /token")


async def _until(predicate):
    """Wait for a node to see a change through its watch on auth/."""
    return await eventually(predicate, what="the node to see the change under auth/")


async def test_a_password_change_ends_the_accounts_tokens_at_once(secured):
    await anyio.to_thread.run_sync(lambda: provision(secured.etcd_url, secured.cluster, users={"dave": "dave-password"},
                                                     robots=(), rules=None))

    async def token_when_known():
        async with httpx.AsyncClient(base_url=secured.url) as c:
            r = await c.get("/token", auth=("dave", "dave-password"))
            return r.json()["token"] if r.status_code == 200 else None

    token = await _until(token_when_known)
    async with httpx.AsyncClient(base_url=secured.url, headers=_bearer(token)) as c:
        assert (await c.get("/v2/")).status_code == 200
        changed = cli("user", "passwd", "dave", "--password-stdin", "--bcrypt-cost", "4", input="dave-new-password\n",
                      etcd=secured.etcd_url, cluster=secured.cluster)
        assert changed.returncode == 0, changed.stderr

        async def refused():
            r = await c.get("/v2/")
            return r if r.status_code == 401 else None

        r = await _until(refused)
        assert 'error="invalid_token"' in r.headers["www-authenticate"] and "password changed" in r.text
    await _wait_for_event(secured.audit_log, event="auth_failed", subject="anonymous",
                          reason="token: the account's password changed since the token was issued")


# ---------------------------------------------------------------- item 9
async def test_refused_credentials_uploads_mounts_cancels_and_deleted_digests_are_audited(secured):
    async with httpx.AsyncClient(base_url=secured.url) as c:
        assert (await c.get("/v2/", headers=_bearer("not.a.token"))).status_code == 401
        assert (await c.get("/v2/", headers={"Authorization": "Basic !!!"})).status_code == 401
    await _wait_for_event(secured.audit_log, event="auth_failed", reason="token: malformed")
    await _wait_for_event(secured.audit_log, event="auth_failed", reason="malformed authorization")

    image = build_image("issue12-audit")
    data = random_bytes(3000, "issue12-audit")
    async with secured.client("alice") as alice:
        blob = await push_blob(alice, "team/au", data)
        r = await alice.post("/v2/team/au2/blobs/uploads/", params={"mount": blob, "from": "team/au"})
        assert r.status_code == 201, describe(r)
        r = await alice.post("/v2/team/au/blobs/uploads/")
        assert r.status_code == 202, describe(r)
        upload = r.headers["location"].rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        assert (await alice.delete(r.headers["location"])).status_code == 204
        await push_image(alice, "team/au", "to-delete", image)
        assert (await alice.delete("/v2/team/au/manifests/to-delete")).status_code == 202

    log = secured.audit_log
    uploaded = await _wait_for_event(log, event="upload", repository="team/au", digest=blob)
    assert uploaded["subject"] == "user:alice" and uploaded["size"] == len(data)
    await _wait_for_event(log, event="mount", repository="team/au2", source="team/au", digest=blob)
    await _wait_for_event(log, event="upload_cancelled", repository="team/au", upload=upload, subject="user:alice")
    await _wait_for_event(log, event="delete", repository="team/au", reference="to-delete", digest=image.digest)
    assert cli("audit", "verify", str(log)).returncode == 0


# ---------------------------------------------------------------- item 15
async def test_forwarded_for_from_a_client_that_is_not_a_trusted_proxy_is_ignored(secured):
    async with httpx.AsyncClient(base_url=secured.url) as c:
        r = await c.get("/v2/", auth=("xff-probe", "wrong"), headers={"X-Forwarded-For": "203.0.113.9"})
        assert r.status_code == 401
    failed = await _wait_for_event(secured.audit_log, event="login_failed", account="xff-probe")
    assert failed["client"] == "127.0.0.1"


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, etcd, cluster_name):
    """A node behind a (pretend) proxy on 127.0.0.1: X-Forwarded-For names the client. Three
    failed logins lock an account; two failure lines per class and client every 3 seconds."""
    settings = tmp_path_factory.mktemp("proxied") / "cargohold.yaml"
    settings.write_text("trusted_proxies: [127.0.0.1/32]\nlogin_rate: 3/60\naudit_failures: 2/3\n")
    s = start_secured(tmp_path_factory, etcd, cluster_name + "-proxied", "--config", str(settings), node_id="p1")
    try:
        yield s
    finally:
        s.node.stop()


def _from(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def test_forwarded_for_from_a_trusted_proxy_names_the_client(proxied):
    async with httpx.AsyncClient(base_url=proxied.url) as c:
        r = await c.get("/v2/", auth=("xff-probe", "wrong"), headers=_from("198.51.100.1, 203.0.113.9"))
        assert r.status_code == 401
    failed = await _wait_for_event(proxied.audit_log, event="login_failed", account="xff-probe")
    assert failed["client"] == "203.0.113.9"


# ---------------------------------------------------------------- item 9: floods
async def test_a_flood_of_failures_is_summarized_not_written_line_by_line(proxied):
    async with httpx.AsyncClient(base_url=proxied.url) as c:
        for _ in range(60):
            assert (await c.get("/v2/team/x/tags/list", headers=_from("192.0.2.66"))).status_code == 401
        # Another class from the same client is still recorded.
        assert (await c.get("/v2/", headers={"Authorization": "Basic !!!", **_from("192.0.2.66")})).status_code == 401

    def counted() -> tuple[list[dict], int]:
        flood = [e for e in _events(proxied.audit_log) if e.get("client") == "192.0.2.66"]
        return flood, sum(1 if e["event"] == "denied" else e["count"] for e in flood
                          if e["event"] == "denied" or e.get("failure") == "denied")

    # The summaries come when their windows close.
    flood, total = await eventually(lambda: (found := counted())[1] >= 60 and found, what="60 counted failures")
    denied = [e for e in flood if e["event"] == "denied"]
    assert total == 60 and 2 <= len(denied) < 20                # 2 every 3 s, however long the flood took
    assert all(e["status"] == 401 for e in flood if e["event"] == "suppressed")
    assert any(e["event"] == "auth_failed" for e in flood)
    assert cli("audit", "verify", str(proxied.audit_log)).returncode == 0


# ---------------------------------------------------------------- item 17
async def test_unlock_lifts_an_account_lock_on_every_node(proxied):
    async with httpx.AsyncClient(base_url=proxied.url) as c:
        async def login(address: str, password: str) -> httpx.Response:
            return await c.get("/token", auth=("reader", password), headers=_from(address))

        for _ in range(3):
            assert (await login("192.0.2.99", "guess")).status_code == 401
        r = await login("192.0.2.7", "reader-password")
        assert r.status_code == 429, describe(r)                    # locked, even with the right password
        unlocked = cli("user", "unlock", "reader", etcd=proxied.etcd_url, cluster=proxied.cluster)
        assert unlocked.returncode == 0 and "unlocked" in unlocked.stdout, unlocked.stderr

        async def admitted():
            r = await login("192.0.2.7", "reader-password")
            return r if r.status_code == 200 else None

        await _until(admitted)
    await _wait_for_event(proxied.audit_log, event="unlocked", account="reader")
    missing = cli("robot", "unlock", "no-such-robot", etcd=proxied.etcd_url, cluster=proxied.cluster)
    assert missing.returncode != 0


def _request(client: str, path: str = "/token") -> Request:
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    return Request({"type": "http", "method": "GET", "path": path, "headers": [], "client": (client, 40000),
                    "query_string": b""}, receive)


@pytest.fixture
async def in_process(secured):
    """The node's AccessControl in this process, over the accounts `secured` provisioned (bcrypt
    cost 4). Successful logins are remembered for a millisecond only, so each login is checked."""
    async with EtcdClient([secured.etcd_url]) as client:
        access = AccessControl(AccountStore(client, secured.cluster), service=secured.service, enforce="on",
                               token_ttl=0.001, account_limiter=FailureLimiter(3, 60))
        await access.prepare()
        yield access


async def _login_status(access: AccessControl, client: str, login: str, password: str) -> int:
    try:
        await access._login(_request(client), login, password)
    except RegistryError as exc:
        return exc.status
    return 200


async def test_an_address_that_logged_in_before_keeps_working_while_the_account_is_locked(in_process):
    assert await _login_status(in_process, "10.0.0.5", "bob", "bob-password") == 200       # bob's usual address
    for _ in range(3):
        assert await _login_status(in_process, "10.0.0.66", "bob", "guess") == 401
    assert await _login_status(in_process, "10.0.0.7", "bob", "bob-password") == 429        # a new address waits
    assert await _login_status(in_process, "10.0.0.66", "bob", "bob-password") == 429
    assert await _login_status(in_process, "10.0.0.5", "bob", "bob-password") == 200        # the usual one does not


# ---------------------------------------------------------------- item 8
async def test_unknown_names_are_checked_against_a_real_hash_of_the_accounts_cost(in_process, monkeypatch):
    checked = []

    def spy(password: str, hashed: str) -> bool:
        checked.append(hashed)
        return bcrypt.checkpw(password.encode(), hashed.encode())    # raises on a malformed hash

    monkeypatch.setattr(node_access, "check_password", spy)
    assert await _login_status(in_process, "10.0.1.1", "no-such-user", "some-password") == 401
    assert await _login_status(in_process, "10.0.1.1", "alice", "wrong-password") == 401
    unknown, known = checked
    assert unknown.split("$")[2] == known.split("$")[2] == "04" and unknown != known
