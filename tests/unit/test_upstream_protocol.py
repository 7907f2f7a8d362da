"""The upstream client's protocol rules and offline bookkeeping, without I/O."""

from __future__ import annotations

from email.utils import formatdate

import anyio
import pytest

from cargohold.upstream import errors, protocol
from cargohold.upstream.client import UpstreamClient, _Credentials
from cargohold.upstream.offline import OfflineTracker


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_bearer_challenge_keeps_commas_inside_quoted_scope():
    challenge = protocol.parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull,push",error="insufficient_scope"')
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.docker.io/token"
    assert challenge.params["scope"] == "repository:library/alpine:pull,push"
    assert challenge.params["service"] == "registry.docker.io"


def test_basic_challenge_and_missing_header():
    assert protocol.parse_challenge('Basic realm="cargohold-tests"') == protocol.Challenge(
        "basic", {"realm": "cargohold-tests"})
    assert protocol.parse_challenge(None) is None
    assert protocol.parse_challenge("  ") is None


def test_token_query_uses_our_scope_and_the_challenges_service():
    challenge = protocol.parse_challenge('Bearer realm="r",service="svc",scope="repository:other:pull"')
    assert protocol.token_query(challenge, "repository:mine:pull") == {"scope": "repository:mine:pull",
                                                                       "service": "svc"}
    assert protocol.token_query(protocol.Challenge("bearer", {"realm": "r"}), "s") == {"scope": "s"}


@pytest.mark.parametrize("document, expected", [
    ({"token": "t", "expires_in": 300}, ("t", 300.0)),
    ({"access_token": "a"}, ("a", protocol.DEFAULT_TOKEN_LIFETIME)),
    ({"token": "t", "expires_in": 0}, ("t", protocol.DEFAULT_TOKEN_LIFETIME)),
    ({"token": "t", "expires_in": "soon"}, ("t", protocol.DEFAULT_TOKEN_LIFETIME)),
])
def test_token_response(document, expected):
    assert protocol.token_from_response(document) == expected


@pytest.mark.parametrize("document", [{}, {"token": ""}, [], "token"])
def test_token_response_without_token_is_denied(document):
    with pytest.raises(errors.UpstreamDenied):
        protocol.token_from_response(document)


def test_tokens_are_cached_per_scope_and_renewed_before_expiry():
    clock = Clock()
    cache = protocol.TokenCache(clock)
    cache.put("repository:a:pull", "ta", 60.0, obtained_at=clock.now)
    assert cache.get("repository:a:pull") == "ta"
    assert cache.get("repository:b:pull") is None
    clock.now += 53.9
    assert cache.get("repository:a:pull") == "ta"
    clock.now += 0.2        # within the renewal margin (a tenth of 60 s) before expiry
    assert cache.get("repository:a:pull") is None


def test_forgotten_token_is_gone():
    cache = protocol.TokenCache(Clock())
    cache.put("s", "t", 300.0, obtained_at=1000.0)
    cache.forget("s")
    assert cache.get("s") is None
    assert "t" not in repr(cache)


@pytest.mark.parametrize("host, name, expected", [
    ("registry-1.docker.io", "alpine", "library/alpine"),
    ("docker.io", "alpine", "library/alpine"),
    ("registry-1.docker.io", "bitnami/redis", "bitnami/redis"),
    ("ghcr.io", "alpine", "alpine"),
    ("127.0.0.1", "alpine", "alpine"),
])
def test_docker_hub_official_images_live_under_library(host, name, expected):
    assert protocol.upstream_repository(host, name) == expected


def test_next_page_from_link_header():
    current = "http://up:5000/v2/a/tags/list?n=2"
    assert protocol.next_page('</v2/a/tags/list?n=2&last=b>; rel="next"', current) == \
        "http://up:5000/v2/a/tags/list?n=2&last=b"
    assert protocol.next_page(None, current) is None
    assert protocol.next_page('</v2/a/tags/list?n=2>; rel="prev"', current) is None


def test_retry_after_in_seconds_or_http_date():
    assert protocol.retry_after_seconds("120") == 120.0
    assert protocol.retry_after_seconds(formatdate(2000.0, usegmt=True), now=1970.0) == 30.0
    assert protocol.retry_after_seconds(None) is None
    assert protocol.retry_after_seconds("whenever") is None


@pytest.mark.parametrize("status, kind", [
    (200, None), (307, None), (404, errors.UpstreamNotFound), (401, errors.UpstreamDenied),
    (403, errors.UpstreamDenied), (429, errors.UpstreamRateLimited), (500, errors.UpstreamUnavailable),
    (503, errors.UpstreamUnavailable), (400, errors.UpstreamError),
])
def test_status_classification(status, kind):
    failure = protocol.failure_for_status(status, "GET x")
    assert failure is None if kind is None else type(failure) is kind


def test_rate_limit_is_a_kind_of_unavailable_with_retry_after():
    failure = protocol.failure_for_status(429, "GET x", "7")
    assert isinstance(failure, errors.UpstreamUnavailable)
    assert failure.retry_after == 7.0


def test_offline_period_then_online_again():
    clock = Clock()
    tracker = OfflineTracker(30.0, clock)
    tracker.check()
    tracker.failed("GET x: timed out")
    assert tracker.offline
    with pytest.raises(errors.UpstreamUnavailable, match="assumed offline.*timed out"):
        tracker.check()
    clock.now += 30.0
    assert not tracker.offline
    tracker.check()


def test_retry_after_stretches_the_offline_period_and_success_ends_it():
    clock = Clock()
    tracker = OfflineTracker(5.0, clock)
    tracker.failed("429", at_least=60.0)
    clock.now += 59.0
    assert tracker.remaining() == pytest.approx(1.0)
    tracker.succeeded()
    assert not tracker.offline


def test_zero_period_never_holds_the_upstream_offline():
    tracker = OfflineTracker(0.0, Clock())
    tracker.failed("boom")
    tracker.check()


def test_credentials_never_show_in_repr():
    client = UpstreamClient("http://127.0.0.1:1", username="alice", password="s3cret-pw")
    try:
        assert "s3cret" not in repr(client) and "alice" not in repr(client)
        assert "s3cret" not in repr(_Credentials("alice", "s3cret-pw"))
        assert "s3cret" not in repr(vars(client))
    finally:
        anyio.run(client.aclose)


def test_client_applies_docker_hub_naming_to_its_upstream_only():
    hub, other = UpstreamClient("https://registry-1.docker.io"), UpstreamClient("https://ghcr.io")
    try:
        assert hub.repository("alpine") == "library/alpine"
        assert hub._url("alpine", "tags/list") == "https://registry-1.docker.io/v2/library/alpine/tags/list"
        assert other.repository("alpine") == "alpine"
    finally:
        anyio.run(hub.aclose)
        anyio.run(other.aclose)
