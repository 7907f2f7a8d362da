"""The replicator's decisions (cargohold.replication.plan), from hand-made cluster pictures:
no etcd, no peers, no clock."""

from __future__ import annotations

from cargohold.coordinator.policies import ReplicationRule, ReplicationRules
from cargohold.coordinator.records import Member
from cargohold.replication.plan import (
    Action, BlobFacts, ClusterView, FetchGroups, Liveness, decide, retry_delay,
)

DIGEST = "sha256:" + "ab" * 32


def member(node_id: str, site: str = "eu", state: str = "active") -> Member:
    return Member(node_id, site, f"http://{node_id}", f"{node_id}:1", state)


def view(me: str, nodes=("a", "b", "c"), *, replicas: int = 2, alive=None, rules=ReplicationRules(),
         dead_since=None, now: float = 1000.0, extra=()) -> ClusterView:
    members = {n: member(n) for n in nodes}
    members.update({m.node_id: m for m in extra})
    return ClusterView(me, members[me].site, replicas, members,
                       frozenset(members if alive is None else alive), rules,
                       dead_since=dead_since or {}, now=now, down_after=300.0)


def blob(holders=(), *, size=100, repos=("team/app",), **kw) -> BlobFacts:
    return BlobFacts(size, frozenset(holders), frozenset(repos), **kw)


def owners_and_outsider(v: ClusterView) -> tuple[list[str], str]:
    owners = v.owners(DIGEST)
    return owners, next(n for n in v.members if n not in owners)


def test_an_owner_without_a_copy_fetches_it():
    owners, outsider = owners_and_outsider(view("a"))
    decision = decide(DIGEST, blob([outsider]), view(owners[0]))
    assert decision.action is Action.FETCH and decision.size == 100


def test_an_owner_that_publishes_its_copy_does_nothing():
    owners, _ = owners_and_outsider(view("a"))
    assert decide(DIGEST, blob(owners, publishes_copy=True), view(owners[0])).action is Action.IDLE


def test_a_holder_that_is_no_owner_drops_only_once_every_owner_holds_a_copy():
    owners, outsider = owners_and_outsider(view("a"))
    assert decide(DIGEST, blob([outsider, owners[0]]), view(outsider)).action is Action.IDLE
    decision = decide(DIGEST, blob([outsider, *owners]), view(outsider))
    assert decision.action is Action.DROP and set(decision.owners) == set(owners)


def test_condemned_and_unrecorded_blobs_are_left_to_others():
    owners, outsider = owners_and_outsider(view("a"))
    assert decide(DIGEST, blob([outsider], condemned=True), view(owners[0])).action is Action.IDLE
    assert decide(DIGEST, blob([outsider], size=None), view(owners[0])).action is Action.IDLE


def test_a_manifest_waits_for_its_blobs_in_this_site():
    owners, outsider = owners_and_outsider(view("a"))
    layer = "sha256:" + "cd" * 32
    facts = {layer: blob([], repos=("team/app",))}
    decision = decide(DIGEST, blob([outsider], dependencies=(layer,)), view(owners[0]), facts.get)
    assert decision.action is Action.WAIT and decision.waiting_on == (layer,)
    facts[layer] = blob([outsider])
    assert decide(DIGEST, blob([outsider], dependencies=(layer,)), view(owners[0]), facts.get).action is Action.FETCH


def test_a_cached_manifest_does_not_wait_for_blobs_the_cluster_never_fetched():
    """A remote repository records a manifest before its blobs (they come on demand, maybe
    never): its bytes replicate at once."""
    owners, outsider = owners_and_outsider(view("a"))
    unfetched = "sha256:" + "ef" * 32
    decision = decide(DIGEST, blob([outsider], dependencies=(unfetched,)), view(owners[0]), {}.get)
    assert decision.action is Action.FETCH


def test_a_member_dead_past_down_after_loses_its_ownership():
    v = view("a")
    owners, _ = owners_and_outsider(v)
    dead = owners[0]
    me = owners[1]
    recently = view(me, alive=set(v.members) - {dead}, dead_since={dead: 900.0})
    assert dead in recently.owners(DIGEST)           # 100 s dead: still an owner, nothing moves
    long_ago = view(me, alive=set(v.members) - {dead}, dead_since={dead: 600.0})
    assert dead not in long_ago.owners(DIGEST) and len(long_ago.owners(DIGEST)) == 2


def test_rules_keep_a_blob_out_of_other_sites():
    rules = ReplicationRules((ReplicationRule("team/*", ("us",)),))
    eu = view("a", rules=rules, extra=[member("u1", "us"), member("u2", "us")])
    assert decide(DIGEST, blob(["u1"]), eu).action is Action.IDLE
    us = view("u1", rules=rules, extra=[member("u1", "us"), member("u2", "us")])
    assert decide(DIGEST, blob(["a"]), us).action is Action.FETCH


def test_sources_skip_this_node_and_dead_ones_and_prefer_the_same_site():
    v = view("a", alive={"a", "b", "u1"}, extra=[member("u1", "us")])
    assert [m.node_id for m in v.sources(DIGEST, ["a", "b", "c", "u1"])] == ["b", "u1"]


def test_fetch_groups_close_at_their_count_or_bytes():
    groups = FetchGroups(max_blobs=2, max_bytes=250)
    assert groups.add("b", "d1", 100) is None
    assert groups.add("b", "d2", 100) is None
    assert groups.add("b", "d3", 100) == ["d1", "d2"]     # two blobs: full
    assert groups.add("c", "d4", 200) is None
    assert groups.add("c", "d5", 100) == ["d4"]           # 300 bytes would pass 250
    assert sorted(groups.rest()) == [["d3"], ["d5"]]
    assert groups.rest() == []


def test_retry_delay_doubles_up_to_a_cap():
    assert retry_delay(0) < retry_delay(1) < retry_delay(2)
    assert retry_delay(50) == retry_delay(60) == 30.0


def test_liveness_reports_when_a_lost_member_becomes_down():
    liveness = Liveness(down_after=300.0)
    members = {n: member(n) for n in ("a", "b")}
    assert liveness.observe(members, {"a", "b"}, now=0.0) is None
    assert liveness.observe(members, {"a"}, now=10.0) == 310.0
    assert liveness.dead_since == {"b": 10.0}
    assert liveness.observe(members, {"a", "b"}, now=20.0) is None and liveness.dead_since == {}
