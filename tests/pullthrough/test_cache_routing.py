"""Pure parts: how names reach a remote repository (Docker Hub's short form, mirror requests),
what an upstream failure is answered with, and the figures `repo status` sums."""

from __future__ import annotations

from cargohold.pullthrough.cache import failure
from cargohold.pullthrough.figures import CacheFigures
from cargohold.repositories.definitions import RemoteRepository
from cargohold.repositories.routing import route
from cargohold.upstream import errors

HUB = RemoteRepository(name="hub", url="https://registry-1.docker.io", exclude=("library/private*",))
QUAY = RemoteRepository(name="mirrors/quay", url="https://quay.io")
DEFINITIONS = {d.name: d for d in (HUB, QUAY)}


def test_cache_docker_hub_short_form_routes_to_library():
    for name in ("hub/alpine", "hub/library/alpine"):
        found = route(DEFINITIONS, name)
        assert (found.repository, found.upstream_name, found.local_name) == (HUB, "library/alpine",
                                                                             "hub/library/alpine")
        assert found.allowed and not found.unprefixed
    nested = route(DEFINITIONS, "hub/bitnami/redis")
    assert nested.upstream_name == "bitnami/redis" and nested.local_name == "hub/bitnami/redis"
    assert route(DEFINITIONS, "mirrors/quay/alpine").upstream_name == "alpine"     # only Docker Hub has library/
    assert route(DEFINITIONS, "team/app") is None                                  # a local name


def test_cache_mirror_requests_route_by_registry():
    for ns in ("docker.io", "index.docker.io", "registry-1.docker.io", "DOCKER.IO"):
        found = route(DEFINITIONS, "library/alpine", ns=ns)
        assert found.repository == HUB and found.local_name == "hub/library/alpine"
    assert route(DEFINITIONS, "coreos/etcd", ns="quay.io").local_name == "mirrors/quay/coreos/etcd"
    assert route(DEFINITIONS, "library/alpine", ns="ghcr.io") is None
    # writes through a mirror path still reach the remote repository (and are refused there)
    assert route(DEFINITIONS, "library/alpine", ns="docker.io", read=False).repository == HUB


def test_cache_docker_default_mirror_only_for_reads():
    mirror = {"hub": HUB.with_changes(docker_mirror=True)}
    found = route(mirror, "library/alpine")
    assert found.unprefixed and found.local_name == "hub/library/alpine"
    assert route(mirror, "library/alpine", read=False) is None


def test_cache_excluded_and_namespace_names_not_allowed():
    assert not route(DEFINITIONS, "hub/library/private-thing").allowed
    assert not route(DEFINITIONS, "hub").allowed


def test_cache_upstream_failures_answered():
    assert failure(errors.UpstreamNotFound("x"), "manifest", "v1", 0).status == 404
    assert failure(errors.UpstreamNotFound("x"), "blob", "sha256:a", 0).code == "BLOB_UNKNOWN"
    assert failure(errors.UpstreamNotFound("x"), "tags", "", 0).code == "NAME_UNKNOWN"
    refused = failure(errors.UpstreamUnavailable("GET /v2/x: ConnectError"), "manifest", "v1", 12.2)
    assert (refused.status, refused.code, refused.headers["Retry-After"]) == (503, "UNAVAILABLE", "13")
    limited = failure(errors.UpstreamRateLimited("429", 40.0), "manifest", "v1", 30.0)
    assert (limited.status, limited.headers["Retry-After"]) == (503, "40")
    broken = failure(errors.UpstreamUnavailable("GET /v2/x/manifests/v1: upstream answered 503", 503),
                     "manifest", "v1", 30)
    assert (broken.status, broken.code) == (502, "UNAVAILABLE")
    offline = failure(errors.UpstreamUnavailable("assumed offline for 3.0s more after: upstream answered 500"),
                      "manifest", "v1", 3.0)
    assert offline.status == 503
    wrong = failure(errors.DigestMismatch("bytes"), "manifest", "v1", 0)
    assert (wrong.status, wrong.code) == (502, "MANIFEST_UNKNOWN")
    assert failure(errors.UpstreamDenied("401"), "blob", "sha256:a", 0).status == 502


def test_cache_figures_summary():
    figures = CacheFigures()
    for result in ("hit", "hit", "miss", "stale", "revalidated", "error"):
        figures.request("hub", result)
    figures.upstream("hub", "GET", "ok", 1000)
    figures.upstream("hub", "HEAD", "ok")
    figures.upstream("hub", "HEAD", "unavailable")
    assert figures.status() == {"hub": {"hits": 2, "misses": 1, "stale": 1, "revalidations": 1,
                                        "upstream_requests": 3, "upstream_errors": 1, "bytes_from_upstream": 1000}}
