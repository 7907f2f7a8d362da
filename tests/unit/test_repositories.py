"""Remote repository definitions and name routing (pure: no etcd, no network)."""

from __future__ import annotations

import json

import pytest

from cargohold.repositories.definitions import (
    DEFAULT_TTL, InvalidDefinition, RemoteRepository, decode_definition, glob_match, is_remote_record,
)
from cargohold.repositories.routing import owning_namespace, route

HUB = RemoteRepository("hub", "https://registry-1.docker.io", username="bob", password="s3cret-pw",
                       ttl=60, include=("library/**", "bitnami/*"), exclude=("library/evil",),
                       evict_unused_after=30 * 86400)
QUAY = RemoteRepository("mirrors/quay", "https://quay.io", mirror_for=("quay.example",))
LOCAL = RemoteRepository("lan", "http://127.0.0.1:5001")


def definitions(*repos: RemoteRepository) -> dict[str, RemoteRepository]:
    return {r.name: r for r in repos}


# ---------------------------------------------------------------------- globs
@pytest.mark.parametrize("pattern, name, matches", [
    ("library/**", "library/alpine", True),
    ("library/**", "library/a/b", True),
    ("library/**", "library", False),
    ("library/*", "library/a/b", False),
    ("bitnami/*", "bitnami/redis", True),
    ("a?c", "abc", True),
    ("a?c", "a/c", False),
    ("a.c", "abc", False),                       # regex characters are literal
    ("*", "alpine", True),
])
def test_glob_match(pattern, name, matches):
    assert glob_match(pattern, name) is matches


def test_include_and_exclude():
    assert HUB.allows("library/alpine") and HUB.allows("bitnami/redis")
    assert not HUB.allows("library/evil")          # excluded though included
    assert not HUB.allows("someone/else")          # not included
    assert RemoteRepository("x", "https://r.example").allows("anything/at/all")


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("url", ["ftp://r.example", "registry-1.docker.io", "https://", "https://r.example/v2",
                                 "https://r.example/?x=1", "https://u:p@r.example"])
def test_bad_upstream_urls_are_refused(url):
    with pytest.raises(InvalidDefinition):
        RemoteRepository("hub", url)


@pytest.mark.parametrize("changes", [{"name": "Hub"}, {"name": "hub//x"}, {"ttl": -1}, {"ttl": float("nan")},
                                     {"offline_period": "soon"}, {"evict_unused_after": 0},
                                     {"password": "pw"}])
def test_bad_settings_are_refused(changes):
    with pytest.raises(InvalidDefinition):
        RemoteRepository(**{"name": "hub", "url": "https://r.example", **changes})


def test_a_trailing_slash_is_the_root():
    assert RemoteRepository("hub", "https://r.example/").url == "https://r.example/"


# ---------------------------------------------------------------------- records
def test_encode_decode_round_trip_keeps_everything():
    for repo in (HUB, QUAY, LOCAL, RemoteRepository("d", "https://r.example", docker_mirror=True)):
        assert RemoteRepository.decode(repo.name, repo.encode()) == repo
        assert decode_definition(repo.name, repo.encode()) == repo


def test_the_password_is_stored_but_never_shown():
    assert json.loads(HUB.encode())["password"] == "s3cret-pw"        # every node needs it to fetch
    shown = json.dumps(HUB.public())
    assert "s3cret-pw" not in shown and "password" not in shown and "user bob" in shown
    assert "s3cret-pw" not in repr(HUB)
    assert LOCAL.public()["credentials"] == "anonymous"


def test_public_shows_the_settings():
    public = HUB.public()
    assert public["name"] == "hub" and public["url"] == "https://registry-1.docker.io"
    assert public["ttl"] == 60 and public["evict_unused_after"] == 30 * 86400
    assert public["include"] == ["library/**", "bitnami/*"] and public["exclude"] == ["library/evil"]
    assert "docker.io" in public["mirror_for"]


def test_a_username_without_password_round_trips():
    repo = RemoteRepository("r", "https://r.example", username="robot")
    assert RemoteRepository.decode("r", repo.encode()).username == "robot"


def test_local_registrations_and_bad_records_are_not_definitions():
    assert decode_definition("team/app", b'{"kind": "local"}') is None
    assert decode_definition("team/app", b"not json") is None
    assert not is_remote_record(b'{"kind": "local"}')
    # A remote record that does not decode must not stop a node's watch: it serves nothing,
    # and `repo remove` can still delete it.
    for broken in (b'{"kind": "remote"}', b'{"kind": "remote", "url": "ftp://x"}',
                   b'{"kind": "remote", "url": "https://r.example", "ttl": "soon"}'):
        assert decode_definition("hub", broken) is None
        assert is_remote_record(broken)


def test_defaults():
    repo = RemoteRepository.decode("r", b'{"kind": "remote", "url": "https://r.example"}')
    assert repo.ttl == DEFAULT_TTL and repo.evict_unused_after is None and repo.include == ()


# ---------------------------------------------------------------------- upstream names, registries
def test_docker_hub_short_names_live_under_library():
    assert HUB.is_docker_hub and HUB.upstream_name("alpine") == "library/alpine"
    assert HUB.upstream_name("bitnami/redis") == "bitnami/redis"
    assert LOCAL.upstream_name("alpine") == "alpine"          # only Docker Hub has `library/`


def test_registries_answered_for_mirror_requests():
    assert {"docker.io", "index.docker.io", "registry-1.docker.io"} <= HUB.registries()
    assert QUAY.registries() == {"quay.io", "quay.example"}
    assert LOCAL.registries() == {"127.0.0.1", "127.0.0.1:5001"}


# ---------------------------------------------------------------------- routing
def test_namespace_routes_to_the_canonical_local_name():
    defs = definitions(HUB, QUAY)
    r = route(defs, "hub/library/alpine")
    assert (r.repository, r.upstream_name, r.local_name, r.allowed, r.unprefixed) == \
        (HUB, "library/alpine", "hub/library/alpine", True, False)
    short = route(defs, "hub/alpine")
    assert short.local_name == "hub/library/alpine" and short.upstream_name == "library/alpine"
    nested = route(defs, "mirrors/quay/coreos/etcd")
    assert nested.repository == QUAY and nested.local_name == "mirrors/quay/coreos/etcd"


def test_excluded_names_route_but_are_not_allowed():
    assert route(definitions(HUB), "hub/library/evil").allowed is False
    assert route(definitions(HUB), "hub/someone/else").allowed is False


def test_the_namespace_itself_serves_nothing():
    r = route(definitions(HUB), "hub")
    assert r.repository == HUB and r.allowed is False


def test_local_names_are_not_routed():
    defs = definitions(HUB, QUAY)
    for name in ("team/app", "hubx/alpine", "mirrors/other", "mirrors"):
        assert route(defs, name) is None, name
    assert owning_namespace(defs, "mirrors/quayx/a") is None


def test_mirror_requests_route_by_ns():
    defs = definitions(HUB, QUAY, LOCAL)
    r = route(defs, "library/alpine", ns="docker.io")
    assert r.repository == HUB and r.local_name == "hub/library/alpine" and not r.unprefixed
    assert route(defs, "alpine", ns="DOCKER.IO").local_name == "hub/library/alpine"
    assert route(defs, "coreos/etcd", ns="quay.example").local_name == "mirrors/quay/coreos/etcd"
    assert route(defs, "app", ns="127.0.0.1:5001").local_name == "lan/app"
    assert route(defs, "team/app", ns="ghcr.io") is None     # no remote repository of that registry


def test_docker_registry_mirrors_take_unclaimed_names_for_reads_only():
    mirror = RemoteRepository("dh", "https://registry-1.docker.io", docker_mirror=True)
    defs = definitions(mirror, QUAY)
    r = route(defs, "library/alpine")
    assert r.repository == mirror and r.unprefixed and r.local_name == "dh/library/alpine"
    assert route(defs, "library/alpine", read=False) is None       # a push goes to the local name
    assert route(defs, "mirrors/quay/x").repository == QUAY         # a namespace wins over the mirror
    two = definitions(mirror, RemoteRepository("dh2", "https://registry-1.docker.io", docker_mirror=True))
    assert route(two, "library/alpine") is None                     # ambiguous: define_repository refuses it


def test_globs_are_the_access_rules_globs_and_bad_ones_are_refused():
    for bad in ("", "Library/*", "a b", "(a)", "a|b"):
        with pytest.raises(InvalidDefinition):
            RemoteRepository("x", "https://r.example", include=(bad,))
