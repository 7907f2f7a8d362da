import pytest

from cargohold.coordinator.policies import Policies, PolicyError, parse, retention_deletions
from cargohold.units import parse_duration

NOW = 1_000_000.0
D = "sha256:" + "a" * 64


def tags(**ages):
    return {name: (D, NOW - age) for name, age in ages.items()}


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("2h") == 7200 and parse_duration("1.5d") == 129600
    assert parse_duration(30) == 30
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_keep_last_keep_tags_and_age():
    policies = parse({"retention": [{"repositories": "team/*", "keep_last": 2, "keep_tags": "^v\\d",
                                     "delete_older_than": "1h"}]})
    t = tags(v1=99999, latest=1, dev3=10, dev2=5000, dev1=9000, nightly=20)
    deleted = [name for name, _ in retention_deletions(policies, "team/app", t, NOW)]
    # v1 kept by pattern; latest and dev3 are the 2 newest; nightly is newer than 1h; dev1, dev2 go.
    assert deleted == ["dev1", "dev2"]
    assert retention_deletions(policies, "other/app", t, NOW) == []


def test_immutable_tags_are_never_retained_away_and_match_by_glob():
    policies = parse({"retention": [{"repositories": "*", "keep_last": 0}],
                      "immutable": [{"repositories": "prod/*", "tags": "v*"}]})
    assert policies.immutable_rule("prod/api", "v1.2") is not None
    assert policies.immutable_rule("prod/api", "latest") is None
    assert policies.immutable_rule("dev/api", "v1.2") is None
    deleted = [name for name, _ in retention_deletions(policies, "prod/api", tags(v1=10, latest=5), NOW)]
    assert deleted == ["latest"]


def test_roundtrip_and_invalid_files():
    policies = parse({"retention": [{"repositories": "a/*", "keep_last": 3}],
                      "immutable": [{"repositories": "b", "tags": "*"}]})
    assert Policies.decode(policies.encode()) == policies
    for bad in ({"retention": [{"keep_last": 1}]}, {"retention": [{"repositories": "x"}]},
                {"retention": [{"repositories": "x", "keep_last": -1}]},
                {"retention": [{"repositories": "x", "keep_last": 1, "keep_tags": "("}]},
                {"immutable": [{"repositories": "x"}]}, {"other": []}, [1]):
        with pytest.raises(PolicyError):
            parse(bad)


def test_replication_rules_pick_sites_per_repository():
    from cargohold.coordinator.policies import ReplicationRules, parse_replication

    rules = parse_replication({"replication": [{"repositories": "eu/*", "sites": ["eu"]},
                                               {"repositories": "both/*", "sites": ["eu", "us"]}]})
    known = {"eu", "us", "ap"}
    assert rules.sites_for(["eu/app"], known) == {"eu"}
    assert rules.sites_for(["eu/app", "both/x"], known) == {"eu", "us"}
    assert rules.sites_for(["other"], known) == known                 # no rule: every site
    assert rules.sites_for([], known) == known
    assert ReplicationRules.decode(rules.encode()) == rules
    for bad in ({"replication": [{"repositories": "x"}]}, {"replication": [{"repositories": "x", "sites": []}]},
                {"rules": []}):
        with pytest.raises(PolicyError):
            parse_replication(bad)
