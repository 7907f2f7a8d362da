"""The OCI conformance suite's requests WITH authentication, against a node that enforces it.

Outside checkers run the suite with credentials (`OCI_USERNAME`/`OCI_PASSWORD`, for the ginkgo
suite and for the newer Go program alike). `SuiteClient` authenticates the
way the Go program's client does: it sends a request without credentials, or with the token it
cached for that repository and kind of request (pull for GET/HEAD, push for POST/PATCH/PUT,
else the method); on a 401 it reads `realm`, `service` and `scope` from the Bearer challenge,
asks the realm for a token with Basic credentials, takes `access_token` or `token`, and retries
once. Without a cache it is the ginkgo suite's client (a fresh token for every request).

What failed before (each test names it): a mount with `from` was a silent plain upload when the
cached token named only the target, and a refused token's challenge (an expired one) named no
scope, so the one retry got a token for nothing.
"""

from __future__ import annotations

import re

import anyio
import httpx
import pytest

from cargohold.auth.tokens import TOKEN_LEEWAY
from tests.auth.conftest import PASSWORDS, start_secured
from tests.support.oci import build_artifact, build_image, describe, digest, random_bytes, with_query

pytestmark = pytest.mark.anyio

TOKEN_TTL = 10          # seconds: the shortest a node allows, so a token can expire inside a test
OCTET = {"Content-Type": "application/octet-stream"}
REPO, SOURCE = "team/conformance/repo1", "team/conformance/repo2"
_PAIR = re.compile(r'(\w+)="([^"]*)"')
_REPOSITORY = re.compile(r"^/v2/(.+?)/(?:blobs|manifests|tags|referrers)/")


@pytest.fixture(scope="module")
def node(tmp_path_factory, etcd, cluster_name):
    s = start_secured(tmp_path_factory, etcd, cluster_name, "--token-ttl", str(TOKEN_TTL))
    try:
        yield s
    finally:
        s.node.stop()


class SuiteClient:
    """The Docker token flow as the conformance suite's client does it (see the module doc)."""

    def __init__(self, base_url: str, username: str, password: str, *, cache: bool = True):
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30.0)
        self.credentials = (username, password)
        self.tokens: dict[tuple[str, str], str] | None = {} if cache else None
        self.challenges: list[tuple[str, str, str]] = []       # (method, path, WWW-Authenticate) of every 401
        self.token_scopes: list[str] = []

    async def __aenter__(self) -> "SuiteClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    @staticmethod
    def _cache_key(method: str, url: httpx.URL) -> tuple[str, str]:
        match = _REPOSITORY.match(url.path)
        kind = {"GET": "pull", "HEAD": "pull", "POST": "push", "PATCH": "push", "PUT": "push"}.get(method, method)
        return (match.group(1) if match else "", kind)

    async def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        request = self.http.build_request(method, url, **kwargs)
        key = self._cache_key(method, request.url)
        if self.tokens is not None and key in self.tokens:
            request.headers["Authorization"] = self.tokens[key]
        response = await self.http.send(request)
        if response.status_code != 401:
            return response
        header = response.headers.get("www-authenticate", "")
        self.challenges.append((method, request.url.path, header))
        assert header.startswith("Bearer "), (method, url, header)
        request.headers["Authorization"] = authorization = await self._token(request.url, dict(_PAIR.findall(header)))
        if self.tokens is not None:
            self.tokens[key] = authorization
        return await self.http.send(request)

    async def _token(self, url: httpx.URL, challenge: dict[str, str]) -> str:
        params = {"service": challenge["service"]}
        if challenge.get("scope"):
            params["scope"] = challenge["scope"]
        self.token_scopes.append(challenge.get("scope", ""))
        r = await self.http.get(url.join(challenge["realm"]), params=params, auth=self.credentials)
        assert r.status_code == 200, describe(r)
        document = r.json()
        return "Bearer " + (document.get("access_token") or document["token"])

    # -- the suite's steps ------------------------------------------------------------------
    async def post_put(self, repo: str, data: bytes, algorithm: str = "sha256") -> httpx.Response:
        r = await self.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, describe(r)
        return await self.request("PUT", with_query(r.headers["Location"], digest=digest(data, algorithm)),
                                  content=data, headers=OCTET)

    async def post_only(self, repo: str, data: bytes, algorithm: str = "sha256") -> httpx.Response:
        return await self.request("POST", f"/v2/{repo}/blobs/uploads/", params={"digest": digest(data, algorithm)},
                                  content=data, headers=OCTET)

    async def chunked(self, repo: str, data: bytes, chunk: int, *, put_last: bool = False) -> httpx.Response:
        r = await self.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        assert r.status_code == 202, describe(r)
        location = r.headers["Location"]
        for start in range(0, len(data), chunk):
            part = data[start:start + chunk]
            headers = {**OCTET, "Content-Range": f"{start}-{start + len(part) - 1}"}
            if put_last and start + chunk >= len(data):
                return await self.request("PUT", with_query(location, digest=digest(data)), content=part,
                                          headers=headers)
            r = await self.request("PATCH", location, content=part, headers=headers)
            assert r.status_code == 202, describe(r)
            location = r.headers["Location"]
        return await self.request("PUT", with_query(location, digest=digest(data)), headers=OCTET)

    async def mount(self, repo: str, blob_digest: str, source: str | None = None) -> httpx.Response:
        params = {"mount": blob_digest, **({"from": source} if source else {})}
        return await self.request("POST", f"/v2/{repo}/blobs/uploads/", params=params)

    async def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str,
                           tags: tuple[str, ...] = ()) -> httpx.Response:
        return await self.request("PUT", f"/v2/{repo}/manifests/{reference}", params=[("tag", t) for t in tags],
                                  content=body, headers={"Content-Type": media_type})

    async def pull_location(self, response: httpx.Response) -> httpx.Response:
        """The suite reads back what a push's `Location` names (relative here, resolved like a URL)."""
        return await self.request("GET", str(response.url.join(response.headers["Location"])))


def alice(node, **kwargs) -> SuiteClient:
    return SuiteClient(node.url, "alice", PASSWORDS["alice"], **kwargs)


def assert_satisfiable(challenges: list[tuple[str, str, str]], realm_prefix: str, service: str) -> None:
    """Every 401 named the realm, the service and a scope for the request's own repository."""
    for method, path, header in challenges:
        fields = dict(_PAIR.findall(header))
        assert fields.get("realm", "").startswith(realm_prefix) and fields.get("service") == service, header
        match = _REPOSITORY.match(path)
        if match:
            assert f"repository:{match.group(1)}:" in fields.get("scope", ""), (method, path, header)


# -- fixed: a mount with `from` when the cached token names only the target ------------------------
async def test_mount_from_asks_for_a_token_that_names_the_source(node):
    data = random_bytes(1_500, "mount-from-cached-token")
    async with alice(node) as client:
        assert (await client.post_put(SOURCE, data)).status_code == 201
        assert (await client.post_put(REPO, random_bytes(100, "earlier-push"))).status_code == 201  # token cached
        mounted = await client.mount(REPO, digest(data), SOURCE)
        assert mounted.status_code == 201, describe(mounted)
        scope = dict(_PAIR.findall(client.challenges[-1][2]))["scope"]
        assert scope == f"repository:{REPO}:pull,push repository:{SOURCE}:pull"
        assert 'error="insufficient_scope"' in client.challenges[-1][2]
        assert (await client.request("HEAD", f"/v2/{REPO}/blobs/{digest(data)}")).status_code == 200
        # The mount without `from` that the program runs next reuses the wider token.
        other = random_bytes(1_600, "mount-anonymous-after")
        assert (await client.post_put(SOURCE, other)).status_code == 201
        assert (await client.mount(REPO, digest(other))).status_code == 201


async def test_mount_from_a_repository_the_rules_refuse_stays_a_silent_upload(node):
    data = random_bytes(1_500, "mount-from-refused")
    async with alice(node) as owner:
        assert (await owner.post_put(SOURCE, data)).status_code == 201
    async with SuiteClient(node.url, "bob", PASSWORDS["bob"]) as bob:
        assert (await bob.post_put("bob/copy", random_bytes(100, "bob-push"))).status_code == 201
        before = len(bob.challenges)
        r = await bob.mount("bob/copy", digest(data), SOURCE)
        assert r.status_code == 202 and len(bob.challenges) == before, describe(r)   # no 401 reveals SOURCE


# -- fixed: a token that expires in the middle of an upload session ------------------------------
async def test_an_expired_token_is_replaced_inside_one_upload_session(node):
    data = random_bytes(3_000, "expiring-token")
    async with alice(node) as client:
        r = await client.request("POST", f"/v2/{REPO}/blobs/uploads/", headers={"Content-Length": "0"})
        r = await client.request("PATCH", r.headers["Location"], content=data[:1_000],
                                 headers={**OCTET, "Content-Range": "0-999"})
        assert r.status_code == 202, describe(r)
        await anyio.sleep(TOKEN_TTL + TOKEN_LEEWAY + 1.5)
        r = await client.request("PATCH", r.headers["Location"], content=data[1_000:],
                                 headers={**OCTET, "Content-Range": "1000-2999"})
        assert r.status_code == 202, describe(r)
        refused = client.challenges[-1][2]
        assert 'error="invalid_token"' in refused and f'scope="repository:{REPO}:pull,push"' in refused
        r = await client.request("PUT", with_query(r.headers["Location"], digest=digest(data)), headers=OCTET)
        assert r.status_code == 201, describe(r)


async def test_a_refused_token_is_challenged_with_the_scope_the_request_needs(node):
    async with httpx.AsyncClient(base_url=node.url) as client:
        r = await client.get(f"/v2/{REPO}/tags/list", headers={"Authorization": "Bearer not.a.token"})
    assert r.status_code == 401
    challenge = dict(_PAIR.findall(r.headers["www-authenticate"]))
    assert challenge["error"] == "invalid_token" and challenge["scope"] == f"repository:{REPO}:pull"


# -- unchanged, kept from regressing ---------------------------------------------------------------
async def test_every_anonymous_401_carries_a_challenge_for_what_the_request_needs(node):
    zero = "sha256:" + "0" * 64
    upload = f"/v2/{REPO}/blobs/uploads/{'a' * 32}"
    cases = [("HEAD", f"/v2/{REPO}/blobs/{zero}", "pull"), ("HEAD", f"/v2/{REPO}/manifests/v1", "pull"),
             ("GET", f"/v2/{REPO}/tags/list", "pull"), ("GET", f"/v2/{REPO}/referrers/{zero}", "pull"),
             ("POST", f"/v2/{REPO}/blobs/uploads/", "pull,push"), ("GET", upload, "pull,push"),
             ("PATCH", upload, "pull,push"), ("PUT", upload + f"?digest={zero}", "pull,push"),
             ("DELETE", upload, "pull,push"), ("DELETE", f"/v2/{REPO}/manifests/{zero}", "delete"),
             ("DELETE", f"/v2/{REPO}/blobs/{zero}", "delete"), ("PUT", f"/v2/{REPO}/manifests/v1", "pull,push")]
    async with httpx.AsyncClient(base_url=node.url) as anonymous:
        for method, path, actions in cases:
            r = await anonymous.request(method, path)
            challenge = dict(_PAIR.findall(r.headers.get("www-authenticate", "")))
            assert r.status_code == 401 and challenge.get("scope") == f"repository:{REPO}:{actions}", (method, path)
            assert challenge["realm"] == f"{node.url}/token" and challenge["service"] == node.service
        r = await anonymous.post(f"/v2/{REPO}/blobs/uploads/", params={"mount": zero, "from": SOURCE})
        scope = dict(_PAIR.findall(r.headers["www-authenticate"]))["scope"]
        assert scope == f"repository:{REPO}:pull,push repository:{SOURCE}:pull"


@pytest.mark.parametrize("cache", [True, False], ids=["go-program", "ginkgo"])
async def test_the_suites_flow_with_bearer_tokens_end_to_end(node, cache):
    repo, source = f"{REPO}-{int(cache)}", f"{SOURCE}-{int(cache)}"
    async with alice(node, cache=cache) as c:
        assert (await c.request("GET", "/v2/")).status_code == 200
        blobs = {name: random_bytes(size, f"{name}-{cache}") for name, size in
                 [("post-put", 2_000), ("post-only", 2_100), ("chunked", 3_000), ("put-last", 3_100),
                  ("stream", 2_200), ("sha512", 1_900)]}
        pushed = [await c.post_put(repo, blobs["post-put"]), await c.post_only(repo, blobs["post-only"]),
                  await c.chunked(repo, blobs["chunked"], 1_024),
                  await c.chunked(repo, blobs["put-last"], 1_024, put_last=True),
                  await c.post_put(repo, blobs["sha512"], "sha512")]
        for r in pushed:
            assert r.status_code == 201, describe(r)
            assert (await c.pull_location(r)).status_code == 200
        # stream: one PATCH without Content-Range; cancel; out of order, then the status GET
        r = await c.request("POST", f"/v2/{repo}/blobs/uploads/")
        r = await c.request("PATCH", r.headers["Location"], content=blobs["stream"], headers=OCTET)
        r = await c.request("PUT", with_query(r.headers["Location"], digest=digest(blobs["stream"])), headers=OCTET)
        assert r.status_code == 201, describe(r)
        r = await c.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert (await c.request("DELETE", r.headers["Location"])).status_code == 204
        r = await c.request("POST", f"/v2/{repo}/blobs/uploads/")
        location = r.headers["Location"]
        r = await c.request("PATCH", location, content=b"x" * 10, headers={**OCTET, "Content-Range": "100-109"})
        assert r.status_code == 416, describe(r)
        r = await c.request("GET", location)
        assert r.status_code == 204 and "Range" in r.headers, describe(r)

        # mounts: with `from`, without it, and of a blob the source lacks
        mounted = random_bytes(1_700, f"mounted-{cache}")
        assert (await c.post_put(source, mounted)).status_code == 201
        assert (await c.mount(repo, digest(mounted), source)).status_code == 201
        assert (await c.mount(repo, digest(random_bytes(10, "missing")), source)).status_code == 202

        # manifests: an image by digest with tag parameters, an artifact with a subject
        image = build_image(f"image-{cache}")
        for data in image.blobs.values():
            assert (await c.post_put(repo, data)).status_code == 201
        r = await c.put_manifest(repo, image.digest, image.manifest, image.media_type, tags=("image", "latest"))
        assert r.status_code == 201 and r.headers.get_list("OCI-Tag") == ["image", "latest"], describe(r)
        assert (await c.pull_location(r)).content == image.manifest
        artifact = build_artifact(f"artifact-{cache}", subject=image)
        for data in artifact.blobs.values():
            assert (await c.post_put(repo, data)).status_code == 201
        r = await c.put_manifest(repo, artifact.digest, artifact.manifest, artifact.media_type)
        assert r.status_code == 201 and r.headers["OCI-Subject"] == image.digest, describe(r)

        # discovery: referrers (also filtered), tags list with n and its Link
        r = await c.request("GET", f"/v2/{repo}/referrers/{image.digest}")
        assert [m["digest"] for m in r.json()["manifests"]] == [artifact.digest], describe(r)
        r = await c.request("GET", f"/v2/{repo}/referrers/{image.digest}", params={"artifactType": "none/such"})
        assert r.status_code == 200 and r.json()["manifests"] == [], describe(r)
        r = await c.request("GET", f"/v2/{repo}/tags/list", params={"n": "1"})
        assert r.json()["tags"] == ["image"], describe(r)
        following = r.headers["Link"].split(";")[0].strip("<>")
        assert (await c.request("GET", str(r.url.join(following)))).json()["tags"] == ["latest"]

        # management: tags, then manifests, then blobs; each gone at once
        for tag in ("image", "latest"):
            assert (await c.request("DELETE", f"/v2/{repo}/manifests/{tag}")).status_code == 202
            assert (await c.request("HEAD", f"/v2/{repo}/manifests/{tag}")).status_code == 404
        for manifest in (artifact.digest, image.digest):
            assert (await c.request("DELETE", f"/v2/{repo}/manifests/{manifest}")).status_code == 202
            assert (await c.request("HEAD", f"/v2/{repo}/manifests/{manifest}")).status_code == 404
        for blob in {**image.blobs, **artifact.blobs, digest(mounted): mounted}:
            r = await c.request("DELETE", f"/v2/{repo}/blobs/{blob}")
            assert r.status_code == 202, describe(r)
            assert (await c.request("HEAD", f"/v2/{repo}/blobs/{blob}")).status_code == 404

    assert_satisfiable(c.challenges, f"{node.url}/token", node.service)
    assert any(":delete" in scope for scope in c.token_scopes)
    if cache:     # a token per repository and kind of request (and per wider scope), not one per request
        assert len(c.token_scopes) <= 10, c.token_scopes
