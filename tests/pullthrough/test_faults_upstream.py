"""An upstream that dies, stalls, serves wrong bytes or moves a tag, seen through the cache: cached
content keeps being served (`X-Cargohold-Cache: stale`), what is not cached fails within a bounded
time with a JSON error, a stalled upstream costs one timeout and is then assumed offline, wrong
bytes are never cached, and a moved tag is followed after its ttl while the old digest stays."""

from __future__ import annotations

import time
import uuid

import anyio
import httpx
import pytest

from tests.pullthrough.conftest import (UPSTREAM_READ_TIMEOUT, cache_state, json_error_codes, manifest_get,
                                        pullthrough_counts)
from tests.support.oci import build_image, describe, digest, read_oci_layout
from tests.support.poll import until
from tests.support.scripted_http import Answer, Asked, scripted_server
from tests.support.skopeo import SkopeoError, copy, inspect

pytestmark = pytest.mark.anyio

FAST = 5.0            # seconds: an answer that waits for no upstream timeout (generous for a loaded machine)
TTL = 1.0             # the remote repositories' --ttl here: tags are revalidated after a second


def _pull_once(node, name: str, tag: str, image) -> None:
    """A first pull through the cache: the manifest by tag and every blob."""
    response = manifest_get(node, name, tag)
    assert response.status_code == 200 and response.content == image.manifest, describe(response)
    for blob_digest, data in image.blobs.items():
        blob = httpx.get(f"{node.url}/v2/{name}/blobs/{blob_digest}", timeout=30)
        assert blob.status_code == 200 and blob.content == data, describe(blob)


def _timed(call, *args, **kwargs) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call(*args, **kwargs)
    return response, time.monotonic() - started


def _stale(node, name: str, tag: str, image) -> float:
    """Wait until `node` serves the tag as stale (a `hit` while the ttl lasts is "not yet");
    returns how long the stale answer took."""
    def served_stale() -> float:
        response, seconds = _timed(manifest_get, node, name, tag, timeout=UPSTREAM_READ_TIMEOUT + 30)
        assert response.status_code == 200 and response.content == image.manifest, describe(response)
        assert cache_state(response) == "stale", cache_state(response)
        return max(seconds, 1e-6)          # truthy: `until` is done
    return until(served_stale, interval=0.2, what=f"{node.url} serves {name}:{tag} as stale")


def _assert_unavailable(response: httpx.Response, seconds: float, bound: float) -> None:
    assert response.status_code == 503, describe(response)
    assert "UNAVAILABLE" in json_error_codes(response)
    assert int(response.headers["retry-after"]) > 0
    assert seconds < bound, f"answered after {seconds:.1f}s"


async def test_killed_upstream_tag_served_stale_uncached_fails_fast(upstreams, cache_cluster, remote_name, tmp_path):
    upstream = upstreams.distribution()
    image = build_image(f"killed-{uuid.uuid4().hex[:8]}")
    upstream.seed(tmp_path, "library/app", "v1", image)
    cache_cluster.add_remote(remote_name, upstream.url, "--ttl", f"{TTL:g}s")
    name = f"{remote_name}/library/app"
    first, second = cache_cluster.members[:2]
    _pull_once(first, name, "v1", image)

    upstream.kill()

    for node in (first, second):          # cached in the cluster: every node serves it stale
        _stale(node, name, "v1", image)
    warnings = [line for line in first.log_tail(400).splitlines()
                if " WARNING " in line and "stale" in line and remote_name in line]
    assert warnings, "no warning line for the stale serve"
    assert pullthrough_counts(first, remote_name).get("stale", 0) >= 1
    layout = tmp_path / "pulled-stale"                 # a real client pulls the whole image
    await copy(f"docker://{second.host_port}/{name}:v1", f"oci:{layout}:v1")
    assert set(read_oci_layout(layout)[1]) >= set(image.blobs)

    response, seconds = _timed(manifest_get, first, f"{remote_name}/library/never-pulled", "v1")
    _assert_unavailable(response, seconds, FAST)
    missing_blob = digest(uuid.uuid4().bytes)
    response, seconds = _timed(httpx.get, f"{first.url}/v2/{name}/blobs/{missing_blob}", timeout=30)
    _assert_unavailable(response, seconds, FAST)


async def test_stalled_upstream_times_out_serves_stale_then_is_assumed_offline(upstreams, cache_cluster,
                                                                                remote_name, tmp_path):
    upstream = upstreams.distribution()
    image = build_image(f"stalled-{uuid.uuid4().hex[:8]}")
    upstream.seed(tmp_path, "library/app", "v1", image)
    cache_cluster.add_remote(remote_name, upstream.url, "--ttl", f"{TTL:g}s", "--offline-period", "5m")
    name = f"{remote_name}/library/app"
    node = cache_cluster.members[2]
    _pull_once(node, name, "v1", image)

    upstream.stall()

    waited = _stale(node, name, "v1", image)           # the first revalidation waits for the timeout...
    assert waited < UPSTREAM_READ_TIMEOUT + FAST, f"stale answer after {waited:.1f}s"
    response, seconds = _timed(manifest_get, node, name, "v1")   # ...the next does not: assumed offline
    assert cache_state(response) == "stale" and seconds < FAST, (cache_state(response), seconds)
    response, seconds = _timed(manifest_get, node, f"{remote_name}/library/never-pulled", "v1")
    _assert_unavailable(response, seconds, FAST)
    for other in cache_cluster.members[:2]:        # the same site: spared the wait by node 3's notice
        response, seconds = _timed(manifest_get, other, f"{remote_name}/library/never-pulled", "v1")
        _assert_unavailable(response, seconds, FAST)
        assert "assumed offline" in response.text, response.text


def _lying_upstream(image, bad_blob: str, wrong: bytes):
    """A script for an upstream that serves `image` but `wrong` bytes (same length) for `bad_blob`."""
    manifest_headers = {"Content-Type": image.media_type, "Docker-Content-Digest": image.digest}
    not_found = Answer(404, {"Content-Type": "application/json"},
                       b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}')

    def answer(asked: Asked) -> Answer:
        path = asked.path.split("?")[0]
        if path == "/v2/":
            return Answer(200, {"Content-Type": "application/json"}, b"{}")
        if path in ("/v2/library/bad/manifests/v1", f"/v2/library/bad/manifests/{image.digest}"):
            return Answer(200, manifest_headers, image.manifest)
        blob = path.rpartition("/blobs/")[2]
        if blob == bad_blob:
            return Answer(200, {"Content-Type": "application/octet-stream", "Docker-Content-Digest": bad_blob}, wrong)
        if blob in image.blobs:
            return Answer(200, {"Content-Type": "application/octet-stream", "Docker-Content-Digest": blob},
                          image.blobs[blob])
        return not_found
    return answer


def _fetch(url: str) -> tuple[int, bytes | None]:
    """GET `url` to the end: (status, body), or (-1, None) when the response broke off."""
    try:
        response = httpx.get(url, timeout=30)
    except httpx.TransportError:
        return -1, None
    return response.status_code, response.content


async def test_wrong_bytes_from_the_upstream_fail_the_pull_and_are_never_cached(cache_cluster, remote_name, tmp_path):
    image = build_image(f"lying-{uuid.uuid4().hex[:8]}", layer_size=300_000)
    bad_blob = image.json["layers"][0]["digest"]
    right = image.blobs[bad_blob]
    wrong = right[:-1] + bytes([right[-1] ^ 0xFF])
    first, second = cache_cluster.members[:2]
    async with scripted_server(_lying_upstream(image, bad_blob, wrong)) as upstream:
        await anyio.to_thread.run_sync(cache_cluster.add_remote, remote_name, upstream.url)
        name = f"{remote_name}/library/bad"

        with pytest.raises(SkopeoError):                  # a real client's pull fails...
            await copy(f"docker://{first.host_port}/{name}:v1", f"oci:{tmp_path / 'pulled'}:v1")
        status, body = await anyio.to_thread.run_sync(_fetch, f"{second.url}/v2/{name}/blobs/{bad_blob}")
        assert body != right and body != wrong, status    # ...and no client ever gets the whole wrong body
        asked_before = [a.path for a in upstream.asked if bad_blob in a.path]

        mismatches = sum(pullthrough_counts(node, remote_name, "cargohold_pullthrough_fills_total", "outcome")
                         .get("mismatch", 0) for node in (first, second))
        assert mismatches >= 2, mismatches                 # one failed fill per pull

        # nothing was cached: no node holds it, and the next pull asks the upstream again
        holders = await anyio.to_thread.run_sync(cache_cluster.holders)
        assert bad_blob not in holders
        await anyio.to_thread.run_sync(_fetch, f"{first.url}/v2/{name}/blobs/{bad_blob}")
        assert len([a for a in upstream.asked if bad_blob in a.path]) > len(asked_before)

        config = image.json["config"]["digest"]             # an honest blob of the same upstream is cached
        fetched = await anyio.to_thread.run_sync(_fetch, f"{first.url}/v2/{name}/blobs/{config}")
        assert fetched == (200, image.blobs[config])
    await anyio.to_thread.run_sync(lambda: cache_cluster.wait_until(lambda: config in cache_cluster.holders(),
                                                                    what="the honest blob is in the cluster"))


async def test_moved_tag_is_followed_after_ttl_and_the_old_digest_stays(upstreams, cache_cluster, remote_name,
                                                                        tmp_path):
    ttl = 3.0
    upstream = upstreams.distribution()
    old, new = (build_image(f"moving-{which}-{uuid.uuid4().hex[:8]}") for which in ("old", "new"))
    upstream.seed(tmp_path, "library/moving", "latest", old)
    cache_cluster.add_remote(remote_name, upstream.url, "--ttl", f"{ttl:g}s")
    name = f"{remote_name}/library/moving"
    node, other = cache_cluster.members[1], cache_cluster.members[2]
    assert manifest_get(node, name, "latest").content == old.manifest
    checked_at = time.monotonic()
    old_by_digest = len(upstream.logged(f"/manifests/{old.digest}"))

    upstream.seed(tmp_path, "library/moving", "latest", new)

    within_ttl = manifest_get(node, name, "latest")
    if time.monotonic() - checked_at < ttl / 2:            # (a loaded machine may already be past it)
        assert within_ttl.content == old.manifest and cache_state(within_ttl) == "hit", describe(within_ttl)
    until(lambda: manifest_get(node, name, "latest").content == new.manifest, interval=0.2,
          what="the moved tag is served with its new digest after the ttl")
    assert upstream.logged("/v2/library/moving/manifests/latest", "HEAD"), "the revalidation is a HEAD"
    assert (await inspect(f"docker://{other.host_port}/{name}:latest"))["Digest"] == new.digest
    for server in (node, other):
        by_digest = manifest_get(server, name, old.digest)
        assert by_digest.status_code == 200 and by_digest.content == old.manifest, describe(by_digest)
    assert len(upstream.logged(f"/manifests/{old.digest}")) == old_by_digest, "a digest is never revalidated"
