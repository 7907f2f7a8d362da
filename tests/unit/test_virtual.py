"""Virtual repositories, pure: resolution order, member globs, cycles, deployment targets, the
stored record and the read model that follows it."""

import pytest

from cargohold.coordinator.keys import Keys
from cargohold.coordinator.readmodel import ReadModel
from cargohold.repositories.definitions import InvalidDefinition, RemoteRepository
from cargohold.repositories.virtual import (
    Candidate, Member, VirtualRepository, candidates, check_virtual, decode_virtual, deploy_target, find_cycle,
    is_virtual_record, owning_virtual)

HUB = RemoteRepository("hub", "https://registry-1.docker.io")
QUAY = RemoteRepository("quay", "https://quay.io")
REMOTES = {"hub": HUB, "quay": QUAY}


def virtual(name, *members, deploy_to=None):
    return VirtualRepository(name, tuple(m if isinstance(m, Member) else Member(m) for m in members), deploy_to)


DEV = virtual("dev", "team-a", Member("hub", include=("library/**",)), "quay", deploy_to="team-a")


def names(found):
    return [c.name for c in found]


def test_candidates_follow_member_order():
    found = candidates({"dev": DEV}, REMOTES, "dev/alpine")
    assert found == [Candidate("team-a/alpine", "team-a", ("dev",)), Candidate("hub/alpine", "hub", ("dev",)),
                     Candidate("quay/alpine", "quay", ("dev",))]
    assert names(candidates({"dev": DEV}, REMOTES, "dev/a/b/c")) == ["team-a/a/b/c", "quay/a/b/c"]


def test_names_outside_every_virtual_repository_have_no_candidates():
    assert candidates({"dev": DEV}, REMOTES, "team-a/alpine") is None
    assert candidates({"dev": DEV}, REMOTES, "dev") is None          # the virtual name itself is no image
    assert candidates({}, REMOTES, "dev/alpine") is None
    assert owning_virtual({"dev": DEV}, "dev/x/y") == (DEV, "x/y")


def test_a_remote_members_globs_see_the_upstream_name():
    """`hub` limited to `library/**` serves `dev/alpine` (Docker Hub's `library/alpine`) but never
    `dev/evil/alpine`: a dependency-confusion name is not asked of Docker Hub."""
    assert "hub/alpine" in names(candidates({"dev": DEV}, REMOTES, "dev/alpine"))
    assert "hub/evil/alpine" not in names(candidates({"dev": DEV}, REMOTES, "dev/evil/alpine"))
    local_globs = virtual("v", Member("team-a", include=("app*",), exclude=("app-old",)))
    assert names(candidates({"v": local_globs}, {}, "v/app1")) == ["team-a/app1"]
    assert names(candidates({"v": local_globs}, {}, "v/app-old")) == []
    assert names(candidates({"v": local_globs}, {}, "v/app/x")) == []     # `*` stays within a segment


def test_nested_virtual_repositories_are_flattened_and_read_once():
    inner = virtual("inner", "team-b", "hub", deploy_to="team-b")
    outer = virtual("outer", "team-a", Member("inner", exclude=("secret/**",)), "hub")
    virtuals = {"inner": inner, "outer": outer}
    found = candidates(virtuals, REMOTES, "outer/alpine")
    assert names(found) == ["team-a/alpine", "team-b/alpine", "hub/alpine"]
    assert found[1] == Candidate("team-b/alpine", "inner", ("outer", "inner"))
    assert found[2].member == "inner"        # hub is reached through inner first
    assert names(candidates(virtuals, REMOTES, "outer/secret/x")) == ["team-a/secret/x", "hub/secret/x"]


def test_deploy_target_follows_nested_targets():
    inner = virtual("inner", "team-b", deploy_to="team-b")
    outer = virtual("outer", "team-a", "inner", deploy_to="inner")
    virtuals = {"inner": inner, "outer": outer, "dev": DEV}
    assert deploy_target(virtuals, REMOTES, "dev") == "team-a"
    assert deploy_target(virtuals, REMOTES, "outer") == "team-b"
    assert deploy_target(virtuals, REMOTES, "nope") is None
    assert deploy_target({"v": virtual("v", "team-a")}, REMOTES, "v") is None


def test_cycles_are_found_and_named():
    a, b = virtual("a", "b"), virtual("b", "c", "a")
    assert find_cycle({"a": a, "b": b}) == ["a", "b", "a"]
    assert find_cycle({"a": a, "b": virtual("b", "c")}) is None
    with pytest.raises(InvalidDefinition, match="cycle: b -> a -> b|cycle: a -> b -> a"):
        check_virtual(b, {"a": a}, REMOTES)


def test_check_refuses_deep_nesting_and_pushes_into_a_cache():
    chain = {f"v{i}": virtual(f"v{i}", f"v{i + 1}") for i in range(7)}        # v0 -> ... -> v7: 8 levels
    check_virtual(virtual("v7", "team"), chain, {})
    with pytest.raises(InvalidDefinition, match="deeper than 8"):         # the new one is shallow, v0 is not
        check_virtual(virtual("v7", "v8"), {**chain, "v8": virtual("v8", "team")}, {})
    with pytest.raises(InvalidDefinition, match="hub cannot take pushes"):
        check_virtual(virtual("v", "hub", deploy_to="hub"), {}, REMOTES)
    with pytest.raises(InvalidDefinition, match="inner cannot take pushes"):
        check_virtual(virtual("v", "inner", deploy_to="inner"), {"inner": virtual("inner", "team")}, REMOTES)
    check_virtual(virtual("v", "inner", deploy_to="inner"), {"inner": virtual("inner", "t", deploy_to="t")}, {})


def test_check_refuses_members_inside_other_definitions():
    with pytest.raises(InvalidDefinition, match="inside remote repository hub"):
        check_virtual(virtual("v", "hub/library"), {}, REMOTES)
    with pytest.raises(InvalidDefinition, match="inside virtual repository dev"):
        check_virtual(virtual("v", "dev/team"), {"dev": DEV}, REMOTES)


@pytest.mark.parametrize("members,deploy_to,message", [
    ((), None, "at least one member"),
    (("a", "a"), None, "twice"),
    (("v",), None, "member of itself"),
    (("a",), "b", "must be one of the members"),
    (("Bad",), None, "not a valid repository name"),
])
def test_invalid_definitions(members, deploy_to, message):
    with pytest.raises(InvalidDefinition, match=message):
        virtual("v", *members, deploy_to=deploy_to)


def test_record_round_trip_and_bad_records():
    assert decode_virtual("dev", DEV.encode()) == DEV
    assert DEV.public()["members"][1] == {"name": "hub", "include": ["library/**"], "exclude": []}
    assert is_virtual_record(b'{"kind": "virtual"}') and decode_virtual("dev", b'{"kind": "virtual"}') is None
    for bad in (b'{"kind":"virtual","members":["a"]}', b'{"kind":"virtual","members":[{"name":"a","include":"x"}]}',
                b'{"kind":"virtual","members":[{"name":1}]}', b'{"kind":"virtual","members":[]}'):
        assert decode_virtual("dev", bad) is None, bad
    assert not is_virtual_record(b'{"kind": "local"}') and not is_virtual_record(b"x")


def test_read_model_keeps_virtual_definitions_apart_from_local_namespaces():
    keys = Keys("c1")
    model = ReadModel(keys)
    model.apply_put(keys.repo("dev"), DEV.encode())
    model.apply_put(keys.repo("broken"), b'{"kind": "virtual", "members": 3}')
    model.apply_put(keys.repo("team-a/app"), b'{"kind":"local"}')
    assert model.virtuals == {"dev": DEV} and model.sorted_repos() == ["team-a/app"]
    assert "repositories" in model.take_changes()[1]
    model.apply_put(keys.repo("dev"), HUB.with_changes(name="dev").encode())    # changed kind
    assert "dev" not in model.virtuals and model.definitions["dev"].url == HUB.url
    model.apply_delete(keys.repo("dev"))
    model.apply_delete(keys.repo("broken"))
    assert model.virtuals == {} and model.definitions == {} and model.sorted_repos() == ["team-a/app"]
