from cargohold.replication.placement import owners, preference

DIGESTS = [f"sha256:{i:064x}" for i in range(4000)]


def test_owners_are_deterministic_and_capped():
    nodes = ["a", "b", "c"]
    assert owners(DIGESTS[0], nodes, 2) == owners(DIGESTS[0], list(reversed(nodes)), 2)
    assert len(owners(DIGESTS[0], nodes, 5)) == 3
    assert owners(DIGESTS[0], [], 2) == []


def test_join_moves_only_about_one_nth():
    before = {d: set(owners(d, ["a", "b", "c"], 2)) for d in DIGESTS}
    after = {d: set(owners(d, ["a", "b", "c", "d"], 2)) for d in DIGESTS}
    changed = [d for d in DIGESTS if before[d] != after[d]]
    # The new node takes a share of ownership slots; nothing moves between the old nodes.
    assert all(before[d] - after[d] and after[d] - before[d] == {"d"} for d in changed)
    share = sum("d" in after[d] for d in DIGESTS) / len(DIGESTS)
    assert 0.42 < share < 0.58          # 2 of 4 slots: the new node owns about half of the blobs
    assert 0.42 < len(changed) / len(DIGESTS) < 0.58


def test_leave_moves_only_the_leavers_blobs():
    before = {d: set(owners(d, ["a", "b", "c", "d"], 2)) for d in DIGESTS}
    after = {d: set(owners(d, ["a", "b", "c"], 2)) for d in DIGESTS}
    for d in DIGESTS:
        if "d" not in before[d]:
            assert before[d] == after[d]


def test_preference_puts_self_then_site_first():
    order = preference(DIGESTS[1], ["x1", "me", "s1", "x2"], me="me", same_site={"me", "s1"})
    assert order[:2] == ["me", "s1"] and set(order[2:]) == {"x1", "x2"}


def test_tests_can_choose_a_blob_by_its_owners():
    from tests.support import oci
    from tests.support.placement import blob_owned_by

    for wanted in ({"a"}, {"b"}, {"a", "c"}, {"b", "c"}):
        data = blob_owned_by(wanted, members=("a", "b", "c"), replicas=len(wanted), size=4096, seed="choose")
        assert len(data) == 4096
        assert set(owners(oci.digest(data), ["a", "b", "c"], len(wanted))) == wanted
