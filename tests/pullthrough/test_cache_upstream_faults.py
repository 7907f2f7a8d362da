"""The upstream fails: what is cached is served (stale tags marked as such), and with nothing
cached the client gets a JSON error at once, never a hang."""

from __future__ import annotations

import json
import time

import anyio
import pytest

from tests.pullthrough.conftest import REPO, remote, running_upstream
from tests.support.oci import build_image, digest, error_codes
from tests.support.scripted_http import Answer, scripted_server

pytestmark = pytest.mark.anyio

BOUND = 10.0    # seconds: far below the upstream read timeout (30 s), far above a refused connect


@pytest.fixture(scope="module")
def doomed_upstream(tmp_path_factory):
    with running_upstream(tmp_path_factory.mktemp("doomed-upstream")) as registry:
        yield registry


async def test_cache_stale_serve_when_upstream_killed(etcd, cluster_name, client, node, doomed_upstream):
    hub = await remote(etcd, cluster_name, client, doomed_upstream.url, ttl=1)
    name = f"{hub.name}/{REPO}"
    assert (await client.get(f"/v2/{name}/manifests/v1")).status_code == 200
    assert (await client.get(f"/v2/{name}/tags/list")).status_code == 200
    doomed_upstream.process.kill()
    await anyio.sleep(1.2)

    started = time.monotonic()
    stale = await client.get(f"/v2/{name}/manifests/v1")
    assert stale.status_code == 200, stale.text
    assert stale.content == doomed_upstream.image.manifest
    assert stale.headers["x-cargohold-cache"] == "stale"
    assert f"serving stale {name}:v1" in node.log_path.read_text()

    # the cached tags stand in for the upstream's list
    listed = await client.get(f"/v2/{name}/tags/list")
    assert listed.status_code == 200 and listed.json()["tags"] == ["v1"]

    # nothing cached: a JSON error with Retry-After, at once
    missing = await client.get(f"/v2/{name}/manifests/multi")
    assert missing.status_code == 503 and error_codes(missing) == ["UNAVAILABLE"]
    assert int(missing.headers["retry-after"]) >= 1
    by_digest = await client.get(f"/v2/{name}/manifests/{doomed_upstream.index.digest}")
    assert by_digest.status_code == 503 and error_codes(by_digest) == ["UNAVAILABLE"]
    assert time.monotonic() - started < BOUND

    metrics = (await client.get("/metrics")).text
    assert f'cargohold_pullthrough_requests_total{{repository="{hub.name}",result="stale"}} 1.0' in metrics


def _scripted(status: int, body: bytes = b"", headers: dict | None = None):
    def answer(asked):
        if asked.path == "/v2/":
            return Answer(200, {"Content-Type": "application/json"}, b"{}")
        return Answer(status, headers or {}, body)
    return answer


async def test_cache_upstream_5xx_is_502(etcd, cluster_name, client):
    async with scripted_server(_scripted(500, b"oops")) as server:
        hub = await remote(etcd, cluster_name, client, server.url, offline_period=0)
        response = await client.get(f"/v2/{hub.name}/{REPO}/manifests/v1")
    assert response.status_code == 502 and error_codes(response) == ["UNAVAILABLE"]
    assert "500" in response.json()["errors"][0]["message"]


async def test_cache_upstream_429_is_503_with_retry_after(etcd, cluster_name, client):
    async with scripted_server(_scripted(429, headers={"Retry-After": "7"})) as server:
        hub = await remote(etcd, cluster_name, client, server.url)
        response = await client.get(f"/v2/{hub.name}/{REPO}/manifests/v1")
    assert response.status_code == 503 and error_codes(response) == ["UNAVAILABLE"]
    assert int(response.headers["retry-after"]) >= 6


async def test_cache_upstream_wrong_bytes_not_cached(etcd, cluster_name, client):
    image = build_image("wrong-bytes")
    liar = {"Content-Type": image.media_type, "Docker-Content-Digest": digest(b"something else")}
    async with scripted_server(_scripted(200, image.manifest, liar)) as server:
        hub = await remote(etcd, cluster_name, client, server.url, offline_period=0)
        response = await client.get(f"/v2/{hub.name}/{REPO}/manifests/v1")
        assert response.status_code == 502 and error_codes(response) == ["MANIFEST_UNKNOWN"]
        by_digest = await client.get(f"/v2/{hub.name}/{REPO}/manifests/{digest(b'something else')}")
        assert by_digest.status_code == 502
    catalog = json.loads((await client.get("/v2/_catalog")).content)["repositories"]
    assert f"{hub.name}/{REPO}" not in catalog      # nothing was stored
