"""The upstream registry client against real registries: CNCF Distribution 2.8.2 (plain and
with htpasswd Basic auth) and a cargohold node with access control on (Bearer token flow).
Faults a real registry will not produce on demand come from a scripted loopback server."""

from __future__ import annotations

import time

import anyio
import pytest

from cargohold.oci.reference import parse_digest
from cargohold.upstream import errors
from cargohold.upstream.client import Timeouts, UpstreamClient
from cargohold.upstream.verify import verified
from tests.support.distribution import DistributionProcess
from tests.support.oci import OCI_INDEX, OCI_MANIFEST, digest
from tests.support.scripted_http import Answer, scripted_server
from tests.support.accesslog import settled_log
from tests.upstream.conftest import BASIC_USERS, TAGS, token_requests

pytestmark = pytest.mark.anyio

QUICK = Timeouts(connect=2.0, read=1.0, total=5.0)
MISSING = "sha256:" + "0" * 64


class Clock:
    def __init__(self):
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


async def fetch_blob(upstream: UpstreamClient, repo: str, blob_digest: str) -> bytes:
    out = bytearray()
    async with upstream.stream_blob(repo, blob_digest) as chunks:
        async for chunk in verified(chunks, parse_digest(blob_digest)):
            out += chunk
    return bytes(out)


async def assert_serves_everything(upstream: UpstreamClient, registry) -> None:
    image, index = registry.image, registry.index
    head = await upstream.head_manifest(registry.repo, "v1")
    assert (head.digest, head.media_type, head.size) == (image.digest, OCI_MANIFEST, image.size)
    assert await upstream.get_manifest(registry.repo, "v1") == (image.manifest, OCI_MANIFEST, image.digest)
    assert await upstream.get_manifest(registry.repo, image.digest) == (image.manifest, OCI_MANIFEST, image.digest)
    assert await upstream.get_manifest(registry.repo, "multi") == (index.manifest, OCI_INDEX, index.digest)
    child = index.children[0]
    assert (await upstream.get_manifest(registry.repo, child.digest))[0] == child.manifest
    for blob_digest, data in image.blobs.items():
        assert await fetch_blob(upstream, registry.repo, blob_digest) == data
    assert set(await upstream.tags(registry.repo)) == {*TAGS, "multi"}


# -- Distribution, anonymous -----------------------------------------------------------
async def test_every_call_against_distribution(distribution):
    async with UpstreamClient(distribution.url) as upstream:
        await assert_serves_everything(upstream, distribution)


async def test_missing_things_are_not_found(distribution):
    async with UpstreamClient(distribution.url) as upstream:
        assert await upstream.head_manifest(distribution.repo, "no-such-tag") is None
        assert await upstream.head_manifest("no/such-repo", "v1") is None
        with pytest.raises(errors.UpstreamNotFound):
            await upstream.get_manifest(distribution.repo, MISSING)
        with pytest.raises(errors.UpstreamNotFound):
            await fetch_blob(upstream, distribution.repo, MISSING)
        with pytest.raises(errors.UpstreamNotFound):
            await upstream.tags("no/such-repo")
        assert not upstream.offline.offline, "a 404 says nothing about the upstream being down"


# -- Distribution with htpasswd Basic auth -----------------------------------------------
async def test_basic_credentials_after_one_challenge(basic_distribution):
    user, password = next(iter(BASIC_USERS.items()))
    before = len(basic_distribution.process.requests("/v2/team/app"))
    async with UpstreamClient(basic_distribution.url, username=user, password=password) as upstream:
        await assert_serves_everything(upstream, basic_distribution)
    logged = basic_distribution.process.requests("/v2/team/app")[before:]
    assert [r.status for r in logged].count(401) == 1, "Basic is sent up front once the upstream asked for it"


async def test_wrong_or_missing_basic_credentials_are_denied(basic_distribution):
    for credentials in ({"username": "puller", "password": "wrong-password-91"}, {}):
        async with UpstreamClient(basic_distribution.url, **credentials) as upstream:
            with pytest.raises(errors.UpstreamDenied) as caught:
                await upstream.get_manifest(basic_distribution.repo, "v1")
            assert "wrong-password-91" not in str(caught.value) and "wrong-password-91" not in repr(upstream)


# -- cargohold with access control: the Docker token flow ---------------------------------
ALICE = {"username": "alice", "password": "alice-password"}


async def test_token_flow_with_credentials_against_cargohold(bearer_cargohold):
    async with UpstreamClient(bearer_cargohold.url, **ALICE) as upstream:
        before = token_requests(bearer_cargohold.process)
        await assert_serves_everything(upstream, bearer_cargohold)
        assert token_requests(bearer_cargohold.process) - before == 1, "one token per scope, then cached"


async def test_anonymous_token_flow_runs_once_then_denies(bearer_cargohold):
    async with UpstreamClient(bearer_cargohold.url) as anonymous:
        assert await anonymous.head_manifest("public/app", "v1") is not None
        before = token_requests(bearer_cargohold.process)
        with pytest.raises(errors.UpstreamDenied):
            await anonymous.get_manifest(bearer_cargohold.repo, "v1")
        assert token_requests(bearer_cargohold.process) - before == 1, "an anonymous token, then no loop"


async def test_concurrent_calls_share_one_token_request(bearer_cargohold):
    async with UpstreamClient(bearer_cargohold.url, **ALICE) as upstream:
        await upstream.head_manifest(bearer_cargohold.repo, "v1")     # learns that the upstream wants Bearer
        before = token_requests(bearer_cargohold.process)
        async with anyio.create_task_group() as tasks:
            for tag in TAGS:
                tasks.start_soon(upstream.head_manifest, "public/app", tag)
        assert token_requests(bearer_cargohold.process) - before == 1


async def test_wrong_password_at_the_token_realm_is_denied(bearer_cargohold):
    async with UpstreamClient(bearer_cargohold.url, username="alice", password="not-her-password") as wrong:
        with pytest.raises(errors.UpstreamDenied) as caught:
            await wrong.get_manifest(bearer_cargohold.repo, "v1")
        assert "not-her-password" not in str(caught.value)


async def test_token_renewed_after_it_expires(bearer_cargohold):
    clock = Clock()
    async with UpstreamClient(bearer_cargohold.url, clock=clock, **ALICE) as upstream:
        before = token_requests(bearer_cargohold.process)
        await upstream.head_manifest(bearer_cargohold.repo, "v1")
        await upstream.head_manifest(bearer_cargohold.repo, "v2")
        assert token_requests(bearer_cargohold.process) - before == 1
        clock.now += 301      # the node's tokens live 300 s
        await upstream.head_manifest(bearer_cargohold.repo, "v1")
        assert token_requests(bearer_cargohold.process) - before == 2


async def test_rejected_cached_token_reruns_the_flow_once(bearer_cargohold):
    async with UpstreamClient(bearer_cargohold.url, **ALICE) as upstream:
        await upstream.head_manifest(bearer_cargohold.repo, "v1")
        before = token_requests(bearer_cargohold.process)
        upstream._tokens.put(f"repository:{bearer_cargohold.repo}:pull", "not-a-valid-token", 300, time.monotonic())
        assert await upstream.head_manifest(bearer_cargohold.repo, "v1") is not None
        assert token_requests(bearer_cargohold.process) - before == 1


async def test_tags_follow_link_pagination(bearer_cargohold):
    async with UpstreamClient(bearer_cargohold.url, **ALICE) as upstream:
        assert sorted(await upstream.tags(bearer_cargohold.repo, page_size=2)) == sorted([*TAGS, "multi"])
    log = settled_log(bearer_cargohold.url, bearer_cargohold.process.log_path)
    assert log.count(f"GET /v2/{bearer_cargohold.repo}/tags/list 200") >= 3


# -- faults ---------------------------------------------------------------------------
async def test_killed_upstream_is_unavailable_fast_then_assumed_offline(tmp_path):
    registry = DistributionProcess(tmp_path / "doomed").start()
    url = registry.url
    registry.kill()
    async with UpstreamClient(url, timeouts=QUICK, offline_period=60) as upstream:
        started = time.monotonic()
        with pytest.raises(errors.UpstreamUnavailable) as caught:
            await upstream.get_manifest("team/app", "v1")
        assert time.monotonic() - started < QUICK.connect
        assert "Connect" in caught.value.reason
        with pytest.raises(errors.UpstreamUnavailable, match="assumed offline"):
            await upstream.head_manifest("team/app", "v1")


async def test_stalled_upstream_times_out_within_the_bound():
    async with scripted_server(lambda asked: None) as server:
        async with UpstreamClient(server.url, timeouts=QUICK) as upstream:
            started = time.monotonic()
            with pytest.raises(errors.UpstreamUnavailable, match="timed out"):
                await upstream.head_manifest("team/app", "v1")
            assert QUICK.read <= time.monotonic() - started < QUICK.read + 2


async def test_stalled_blob_body_times_out_mid_stream():
    promises_more = Answer(200, {"Content-Length": "1000"}, b"x" * 10, hold_open=True)
    async with scripted_server(lambda asked: promises_more) as server:
        async with UpstreamClient(server.url, timeouts=QUICK) as upstream:
            started = time.monotonic()
            with pytest.raises(errors.UpstreamUnavailable, match="mid-stream"):
                await fetch_blob(upstream, "team/app", MISSING)
            assert time.monotonic() - started < QUICK.read + 2


async def test_tls_failure_is_unavailable():
    async def plain_http_answer(stream):        # what a TLS client meets at a plain HTTP port
        async with stream:
            await stream.send(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, plain_http_answer)
        async with UpstreamClient(f"https://127.0.0.1:{port}", timeouts=QUICK) as upstream:
            with pytest.raises(errors.UpstreamUnavailable, match="ConnectError"):
                await upstream.head_manifest("team/app", "v1")
        tasks.cancel_scope.cancel()


async def test_rate_limited_upstream_carries_retry_after():
    async with scripted_server(lambda asked: Answer(429, {"Retry-After": "120"})) as server:
        async with UpstreamClient(server.url, offline_period=5) as upstream:
            with pytest.raises(errors.UpstreamRateLimited) as caught:
                await upstream.get_manifest("team/app", "v1")
            assert caught.value.retry_after == 120
            assert upstream.offline.remaining() > 100, "Retry-After stretches the offline period"


async def test_server_error_is_unavailable():
    async with scripted_server(lambda asked: Answer(503)) as server:
        async with UpstreamClient(server.url, offline_period=0) as upstream:
            with pytest.raises(errors.UpstreamUnavailable, match="503"):
                await upstream.tags("team/app")


async def test_wrong_manifest_bytes_are_refused(distribution):
    real = distribution.image

    def script(asked):
        return Answer(200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": real.digest},
                      real.manifest + b" ")

    async with scripted_server(script) as server:
        async with UpstreamClient(server.url) as upstream:
            for reference in ("v1", real.digest):
                with pytest.raises(errors.DigestMismatch):
                    await upstream.get_manifest("team/app", reference)


async def test_wrong_blob_bytes_fail_at_the_end_of_the_stream():
    good = b"the bytes we asked for" * 1000
    wanted = digest(good)

    async with scripted_server(lambda asked: Answer(200, {}, good[:-1] + b"!")) as server:
        async with UpstreamClient(server.url) as upstream:
            with pytest.raises(errors.DigestMismatch):
                await fetch_blob(upstream, "team/app", wanted)


async def test_blob_redirect_is_followed():
    data = b"layer bytes behind a redirect" * 100

    def script(asked):
        if asked.path.startswith("/v2/"):
            return Answer(307, {"Location": "/storage/blob?signature=abc"})
        return Answer(200, {}, data)

    async with scripted_server(script) as server:
        async with UpstreamClient(server.url) as upstream:
            assert await fetch_blob(upstream, "team/app", digest(data)) == data
        assert [a.path.split("?")[0] for a in server.asked] == [f"/v2/team/app/blobs/{digest(data)}",
                                                                "/storage/blob"]


async def test_calls_are_cancellable():
    async with scripted_server(lambda asked: None) as server:
        async with UpstreamClient(server.url, timeouts=Timeouts(read=30, total=60)) as upstream:
            with anyio.move_on_after(0.3) as scope:
                await upstream.get_manifest("team/app", "v1")
            assert scope.cancelled_caught


async def test_leaving_a_blob_stream_early_frees_the_connection(distribution):
    layer = next(d for d, data in distribution.image.blobs.items() if len(data) > 100_000)
    async with UpstreamClient(distribution.url) as upstream:
        for _ in range(3):      # more times than a leaked connection would allow to go unnoticed
            async with upstream.stream_blob(distribution.repo, layer) as chunks:
                async for _chunk in chunks:
                    break
        assert await upstream.head_manifest(distribution.repo, "v1") is not None
