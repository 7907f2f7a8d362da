"""Who may do what, end to end against a real node with access control on (RULES in conftest):
challenges, pull-only users, mounts, catalog filtering, tag protection, the admin API, and the
Docker token flow with tokens that must be refused."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from cargohold.coordinator.accounts import AccountStore, SigningKey
from cargohold.coordinator.etcd import EtcdClient
from cargohold.auth.subjects import ANONYMOUS, Subject
from cargohold.auth.tokens import credential_stamp, encode_token, token_claims
from tests.auth.conftest import TokenAuth, parse_challenge
from tests.support.oci import (
    build_image, describe, digest, error_codes, push_blob, push_image, push_manifest, random_bytes,
)

pytestmark = pytest.mark.anyio


def _unique(prefix: str) -> str:
    return f"{prefix}/r{secrets.token_hex(4)}"


def assert_challenge(r: httpx.Response, secured, scope: str | None, error: str | None = None) -> None:
    assert r.status_code == 401, describe(r)
    assert error_codes(r) == ["UNAUTHORIZED"]
    expected = {"realm": f"{secured.url}/token", "service": secured.service}
    if scope:
        expected["scope"] = scope
    if error:
        expected["error"] = error
    assert parse_challenge(r.headers["www-authenticate"]) == expected


async def test_anonymous_push_and_delete_are_refused_with_a_challenge(secured):
    repo = _unique("team")
    async with secured.client("alice") as alice:
        image_digest = await push_image(alice, repo, "latest", build_image("anon-refused"))
    layer = digest(random_bytes(100, "anon"))
    async with httpx.AsyncClient(base_url=secured.url) as anonymous:
        assert_challenge(await anonymous.get("/v2/"), secured, None)
        assert_challenge(await anonymous.post(f"/v2/{repo}/blobs/uploads/"), secured, f"repository:{repo}:pull,push")
        assert_challenge(await anonymous.post("/v2/public/x/blobs/uploads/", params={"digest": layer}, content=b"x"),
                         secured, "repository:public/x:pull,push")            # anonymous may pull public/, not push
        assert_challenge(await anonymous.put(f"/v2/{repo}/manifests/v2", content=b"{}"), secured,
                         f"repository:{repo}:pull,push")
        assert_challenge(await anonymous.delete(f"/v2/{repo}/manifests/latest"), secured, f"repository:{repo}:delete")
        assert_challenge(await anonymous.delete(f"/v2/{repo}/manifests/{image_digest}"), secured,
                         f"repository:{repo}:delete")
        assert_challenge(await anonymous.get(f"/v2/{repo}/tags/list"), secured, f"repository:{repo}:pull")
        # The token flow does not help: anonymous gets a token that grants nothing here.
        async with httpx.AsyncClient(base_url=secured.url, auth=TokenAuth(None, None)) as flow:
            r = await flow.delete(f"/v2/{repo}/manifests/latest")
            assert r.status_code == 401, describe(r)
    async with secured.client("admin") as admin:
        r = await admin.get(f"/v2/{repo}/tags/list")
        assert r.json()["tags"] == ["latest"], "a refused request changed nothing"


async def test_anonymous_pulls_public_repositories_only(secured):
    public, team = _unique("public"), _unique("team")
    image = build_image("public-pull")
    async with secured.client("alice") as alice:
        await push_image(alice, public, "latest", image)
        await push_image(alice, team, "latest", image)
    async with httpx.AsyncClient(base_url=secured.url) as anonymous:          # no credentials at all
        r = await anonymous.get(f"/v2/{public}/manifests/latest", headers={"Accept": image.media_type})
        assert r.status_code == 200 and r.content == image.manifest, describe(r)
        assert_challenge(await anonymous.get("/v2/_catalog"), secured, "registry:catalog:*")
    async with httpx.AsyncClient(base_url=secured.url, auth=TokenAuth(None, None)) as flow:
        catalog = (await flow.get("/v2/_catalog")).json()["repositories"]
        assert public in catalog and team not in catalog and all(n.startswith("public/") for n in catalog)
        assert (await flow.get(f"/v2/{public}/manifests/latest")).status_code == 200
        assert (await flow.get(f"/v2/{team}/manifests/latest")).status_code == 401


@pytest.mark.parametrize("basic", [False, True], ids=["token", "basic"])
async def test_pull_only_user_cannot_push_or_delete(secured, basic):
    repo = _unique("team")
    image = build_image("pull-only")
    async with secured.client("alice") as alice:
        await push_image(alice, repo, "latest", image)
    async with secured.client("reader", basic=basic) as reader:
        r = await reader.get(f"/v2/{repo}/manifests/latest", headers={"Accept": image.media_type})
        assert r.status_code == 200 and r.content == image.manifest, describe(r)
        for d in image.blobs:
            assert (await reader.head(f"/v2/{repo}/blobs/{d}")).status_code == 200
        data = random_bytes(64, "reader-push")
        r = await reader.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest(data)}, content=data)
        assert r.status_code == 403 and error_codes(r) == ["DENIED"], describe(r)
        r = await push_manifest(reader, repo, "latest", build_image("other").manifest, image.media_type)
        assert r.status_code == 403, describe(r)
        for ref in ("latest", image.digest):
            r = await reader.delete(f"/v2/{repo}/manifests/{ref}")
            assert r.status_code == 403 and error_codes(r) == ["DENIED"], describe(r)
        r = await reader.delete(f"/v2/{repo}/blobs/{next(iter(image.blobs))}")
        assert r.status_code == 403, describe(r)
        r = await reader.get(f"/v2/{repo}/manifests/latest", headers={"Accept": image.media_type})
        assert r.status_code == 200 and r.content == image.manifest, "nothing changed"
        # Outside the rules entirely: another team's namespace.
        r = await reader.get(f"/v2/bob/x/tags/list")
        assert r.status_code == 403, describe(r)


@pytest.mark.parametrize("basic", [False, True], ids=["token", "basic"])
async def test_mount_needs_pull_on_the_source(secured, basic):
    source = _unique("team")
    data = random_bytes(2000, f"mount-{basic}")
    async with secured.client("alice") as alice:
        blob = await push_blob(alice, source, data)
    target = f"bob/m{secrets.token_hex(3)}"
    async with secured.client("bob", basic=basic) as bob:
        r = await bob.post(f"/v2/{target}/blobs/uploads/", params={"mount": blob, "from": source})
        assert r.status_code == 202, describe(r)                   # a plain upload: the blob is not revealed
        assert blob not in r.headers.get("location", "") and "docker-content-digest" not in r.headers
        assert (await bob.head(f"/v2/{target}/blobs/{blob}")).status_code == 404
        assert (await bob.get(f"/v2/{source}/blobs/{blob}")).status_code in (401, 403)
    other = _unique("team")
    async with secured.client("alice", basic=basic) as alice:
        # The token flow follows the challenge, which asks for pull on `from` too.
        r = await alice.post(f"/v2/{other}/blobs/uploads/", params={"mount": blob, "from": source})
        assert r.status_code == 201, describe(r)
        assert (await alice.get(f"/v2/{other}/blobs/{blob}")).content == data


async def _mount_with_the_challenged_token(secured, login: str, target: str, source: str, blob: str):
    """A mount as a client following the Docker token flow step by step: the challenge, a token
    for exactly the challenge's scopes, the mount again with it. Returns (response, token)."""
    async with httpx.AsyncClient(base_url=secured.url, timeout=30.0) as http:
        r = await http.post(f"/v2/{target}/blobs/uploads/", params={"mount": blob, "from": source})
        assert_challenge(r, secured, f"repository:{target}:pull,push repository:{source}:pull")
        scope = parse_challenge(r.headers["www-authenticate"])["scope"]
        token = await _token(secured, login, scope)
        r = await http.post(f"/v2/{target}/blobs/uploads/", params={"mount": blob, "from": source},
                            headers={"Authorization": f"Bearer {token}"})
        return r, token


async def test_mount_challenge_asks_for_pull_on_the_source(secured):
    """As Distribution: the 401 for a mount names both repositories, so the token a client gets
    by following it lets the mount succeed instead of falling back to a full upload."""
    source, target = _unique("team"), _unique("team")
    data = random_bytes(1500, "mount-challenge")
    async with secured.client("alice") as alice:
        blob = await push_blob(alice, source, data)
    r, token = await _mount_with_the_challenged_token(secured, "alice", target, source, blob)
    assert sorted(_claims(token)["access"], key=lambda a: a["name"] != target) == [
        {"type": "repository", "name": target, "actions": ["pull", "push"]},
        {"type": "repository", "name": source, "actions": ["pull"]}]
    assert r.status_code == 201, describe(r)
    assert r.headers["location"] == f"/v2/{target}/blobs/{blob}" and r.headers["docker-content-digest"] == blob
    async with httpx.AsyncClient(base_url=secured.url, headers={"Authorization": f"Bearer {token}"}) as http:
        r = await http.get(f"/v2/{target}/blobs/{blob}")
        assert r.status_code == 200 and r.content == data, describe(r)


async def test_mount_challenge_without_pull_on_the_source_falls_back_to_an_upload(secured):
    """bob may push to bob/* but not pull from team/**: his token leaves the source out, and the
    mount is a plain upload session that reveals nothing about the blob."""
    source, target = _unique("team"), f"bob/m{secrets.token_hex(3)}"
    async with secured.client("alice") as alice:
        blob = await push_blob(alice, source, random_bytes(1500, "mount-denied"))
    r, token = await _mount_with_the_challenged_token(secured, "bob", target, source, blob)
    granted = {a["name"]: a["actions"] for a in _claims(token)["access"]}
    assert granted[target] == ["pull", "push"] and not granted.get(source)
    assert r.status_code == 202, describe(r)
    assert blob not in r.headers.get("location", "") and "docker-content-digest" not in r.headers
    async with httpx.AsyncClient(base_url=secured.url, headers={"Authorization": f"Bearer {token}"}) as http:
        assert (await http.head(f"/v2/{target}/blobs/{blob}")).status_code == 404


async def test_catalog_and_referrers_show_only_what_the_caller_may_pull(secured):
    team, bobs = _unique("team"), f"bob/c{secrets.token_hex(3)}"
    image = build_image("catalog")
    async with secured.client("alice") as alice:
        await push_image(alice, team, "latest", image)
    async with secured.client("bob") as bob:
        await push_image(bob, bobs, "latest", image)
        names = (await bob.get("/v2/_catalog")).json()["repositories"]
        assert bobs in names and team not in names and all(n.startswith(("bob/", "public/")) for n in names)
        r = await bob.get(f"/v2/{team}/referrers/{image.digest}")
        assert r.status_code in (401, 403), describe(r)
    async with secured.client("reader") as reader:
        names = (await reader.get("/v2/_catalog")).json()["repositories"]
        assert team in names and bobs not in names
        first = await reader.get("/v2/_catalog", params={"n": 1})
        assert len(first.json()["repositories"]) == 1 and first.json()["repositories"][0] == sorted(names)[0]
        assert (await reader.get(f"/v2/{team}/referrers/{image.digest}")).status_code == 200
    async with secured.client("admin") as admin:
        names = (await admin.get("/v2/_catalog")).json()["repositories"]
        assert team in names and bobs in names


async def test_protected_tags_are_pushed_and_deleted_only_by_their_subjects(secured):
    repo = _unique("team")
    image, newer = build_image("protected-1"), build_image("protected-2")
    async with secured.client("alice") as alice, secured.client("robot$ci") as ci:
        for data in (*image.blobs.values(), *newer.blobs.values()):
            await push_blob(alice, repo, data)
        r = await push_manifest(alice, repo, "v1", image.manifest, image.media_type)
        assert r.status_code == 403 and error_codes(r) == ["DENIED"], describe(r)
        r = await push_manifest(ci, repo, "v1", image.manifest, image.media_type)
        assert r.status_code == 201, describe(r)
        r = await push_manifest(alice, repo, "v1", newer.manifest, newer.media_type)      # overwrite
        assert r.status_code == 403, describe(r)
        r = await push_manifest(alice, repo, "stable", newer.manifest, newer.media_type)
        assert r.status_code == 403, describe(r)
        r = await push_manifest(alice, repo, "latest", image.manifest, image.media_type)  # unprotected tag
        assert r.status_code == 201, describe(r)
        for ref in ("v1", image.digest):   # by digest would drop the protected tag pointing at it
            r = await alice.delete(f"/v2/{repo}/manifests/{ref}")
            assert r.status_code == 403 and error_codes(r) == ["DENIED"], describe(r)
        r = await alice.get(f"/v2/{repo}/manifests/v1", headers={"Accept": image.media_type})
        assert r.status_code == 200 and r.content == image.manifest, "v1 is untouched"
        assert (await ci.delete(f"/v2/{repo}/manifests/v1")).status_code == 202
        assert (await alice.get(f"/v2/{repo}/manifests/v1")).status_code == 404


async def test_admin_api_requires_admin(secured):
    async with httpx.AsyncClient(base_url=secured.url) as anonymous:
        assert_challenge(await anonymous.get("/admin/nodes"), secured, "registry:admin:*")
    async with secured.client("alice", basic=True) as alice:
        r = await alice.get("/admin/nodes")
        assert r.status_code == 403 and error_codes(r) == ["DENIED"], describe(r)
    token = await _token(secured, "alice", "registry:admin:*")
    async with httpx.AsyncClient(base_url=secured.url, headers={"Authorization": f"Bearer {token}"}) as alice:
        assert (await alice.get("/admin/nodes")).status_code == 403
    async with secured.client("admin", basic=True) as admin:
        assert (await admin.get("/admin/nodes")).status_code not in (401, 403)
    for login, granted in (("admin", ["*"]), ("alice", [])):
        claims = _claims(await _token(secured, login, "registry:admin:*"))
        assert claims["access"] == [{"type": "registry", "name": "admin", "actions": granted}]
    # A pull token of an admin is not an admin token.
    token = await _token(secured, "admin", "repository:team/x:pull")
    async with httpx.AsyncClient(base_url=secured.url, headers={"Authorization": f"Bearer {token}"}) as admin:
        assert (await admin.get("/admin/nodes")).status_code == 401


# ---------------------------------------------------------------------- tokens
async def _token(secured, login: str | None, *scopes: str) -> str:
    secret = secured.robots.get(login) or {"alice": "alice-password", "admin": "admin-password",
                                           "reader": "reader-password", "bob": "bob-password"}.get(login)
    async with httpx.AsyncClient(base_url=secured.url, auth=(login, secret) if login else None) as c:
        r = await c.get("/token", params={"service": secured.service, "scope": list(scopes)})
        assert r.status_code == 200, describe(r)
        body = r.json()
        assert body["token"] == body["access_token"] and body["expires_in"] == 300 and body["issued_at"]
        return body["token"]


def _claims(token: str) -> dict:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})


async def _signing_key(secured) -> SigningKey:
    async with EtcdClient([secured.etcd_url]) as client:
        store = AccountStore(client, secured.cluster)
        await store.load()
        return store.current_signing_key()


async def _stamp(secured, login: str) -> str:
    """The password stamp a token of `login` carries (issue 12: a password change ends its tokens)."""
    async with EtcdClient([secured.etcd_url]) as client:
        store = AccountStore(client, secured.cluster)
        await store.load()
        return credential_stamp(store.account(login).password_hash)


async def test_token_claims_follow_the_docker_spec(secured):
    repo = _unique("team")
    token = await _token(secured, "reader", f"repository:{repo}:pull,push", "repository:bob/x:pull")
    claims = _claims(token)
    assert claims["sub"] == "reader" and claims["aud"] == secured.service and claims["iss"] == secured.service
    assert claims["exp"] - claims["iat"] == 300 and claims["jti"]
    assert claims["access"] == [{"type": "repository", "name": repo, "actions": ["pull"]},
                                {"type": "repository", "name": "bob/x", "actions": []}]
    anonymous = _claims(await _token(secured, None, "repository:public/a:pull,push"))
    assert anonymous["sub"] == "" and anonymous["access"][0]["actions"] == ["pull"]


async def test_expired_forged_wrong_audience_and_wrong_scope_tokens_are_refused(secured):
    repo = _unique("team")
    image = build_image("tokens")
    async with secured.client("alice") as alice:
        await push_image(alice, repo, "latest", image)
    await _token(secured, "alice")                    # the cluster has a signing key from here on
    key = await _signing_key(secured)
    alice = Subject("user", "alice", frozenset({"devs"}))
    pull = [{"type": "repository", "name": repo, "actions": ["pull"]}]
    now = time.time()
    stamp = await _stamp(secured, "alice")

    async def get(token: str, path: str = f"/v2/{repo}/manifests/latest", method: str = "GET") -> httpx.Response:
        async with httpx.AsyncClient(base_url=secured.url) as c:
            return await c.request(method, path, headers={"Authorization": f"Bearer {token}"})

    valid = encode_token(token_claims(alice, pull, secured.service, 300, now, stamp), key)
    assert (await get(valid)).status_code == 200
    cases = {
        "expired": encode_token(token_claims(alice, pull, secured.service, 300, now - 400, stamp), key),
        "forged": encode_token(token_claims(alice, pull, secured.service, 300, now, stamp),
                               SigningKey(key.key_id, secrets.token_bytes(32), 0)),
        "unknown key": encode_token(token_claims(alice, pull, secured.service, 300, now, stamp),
                                    SigningKey("0123456789abcdef", secrets.token_bytes(32), 0)),
        "wrong audience": encode_token(token_claims(alice, pull, "another-registry", 300, now, stamp), key),
        "garbage": "not.a.token",
    }
    for what, token in cases.items():
        r = await get(token)
        assert r.status_code == 401, f"{what}: {describe(r)}"
        assert parse_challenge(r.headers["www-authenticate"]).get("error") == "invalid_token", what
    # Right key, wrong scope: another repository, or an action the token does not carry.
    r = await get(valid, f"/v2/{_unique('team')}/tags/list")
    assert r.status_code == 401 and parse_challenge(r.headers["www-authenticate"])["error"] == "insufficient_scope"
    r = await get(valid, f"/v2/{repo}/manifests/latest", "DELETE")
    assert r.status_code == 401 and parse_challenge(r.headers["www-authenticate"])["error"] == "insufficient_scope"
    # A token's claims never exceed the rules: a (validly signed) push grant for a pull-only user.
    reader = Subject("user", "reader")
    grant_all = [{"type": "repository", "name": repo, "actions": ["pull", "push", "delete"]}]
    r = await get(encode_token(token_claims(reader, grant_all, secured.service, 300, now,
                                            await _stamp(secured, "reader")), key),
                  f"/v2/{repo}/manifests/latest", "DELETE")
    assert r.status_code == 403, describe(r)
    # Nor does anonymous with a hand-made grant get anywhere.
    r = await get(encode_token(token_claims(ANONYMOUS, grant_all, secured.service, 300, now), key))
    assert r.status_code == 401, describe(r)
    async with secured.client("alice") as c:
        assert (await c.get(f"/v2/{repo}/manifests/latest")).status_code == 200, "nothing was deleted"


async def test_removed_account_tokens_stop_working_at_once(secured):
    from tests.auth.conftest import provision
    from tests.support.poll import eventually

    import anyio

    await anyio.to_thread.run_sync(lambda: provision(secured.etcd_url, secured.cluster, users={"temp": "temp-password"},
                                                     robots=(), rules=None))
    async with httpx.AsyncClient(base_url=secured.url, auth=("temp", "temp-password")) as c:
        async def token_issued():                # the node learns of the account through its watch
            r = await c.get("/token", params={"scope": "repository:team/x:pull"})
            return r.status_code == 200 and r.json()["token"]
        token = await eventually(token_issued, what="a token for the new account")
    async with httpx.AsyncClient(base_url=secured.url, headers={"Authorization": f"Bearer {token}"}) as c:
        assert (await c.get("/v2/")).status_code == 200
        async with EtcdClient([secured.etcd_url]) as client:
            assert await AccountStore(client, secured.cluster).remove_account("user", "temp")
        async def refused() -> bool:
            return (await c.get("/v2/")).status_code == 401
        await eventually(refused, what="the removed account's token to be refused")


async def test_oauth2_form_post_and_token_endpoint_errors(secured):
    async with httpx.AsyncClient(base_url=secured.url) as c:
        r = await c.post("/token", data={"grant_type": "password", "username": "alice", "password": "alice-password",
                                        "service": secured.service, "scope": "repository:team/a:pull repository:team/b:push",
                                        "client_id": "containerd"})
        assert r.status_code == 200, describe(r)
        assert [e["name"] for e in _claims(r.json()["access_token"])["access"]] == ["team/a", "team/b"]
        r = await c.post("/token", data={"grant_type": "password", "username": "alice", "password": "nope"})
        assert r.status_code == 401 and error_codes(r) == ["UNAUTHORIZED"]
        r = await c.post("/token", data={"grant_type": "refresh_token", "refresh_token": "x"})
        assert r.status_code == 400
        r = await c.get("/token", params={"service": "someone-else"})
        assert r.status_code == 400
        r = await c.get("/token", params={"scope": "repository:team/a:pull"}, auth=("alice", "wrong-password"))
        assert r.status_code == 401
        assert (await c.delete("/token")).status_code == 405
