"""The collector's decisions that need no etcd: the schedule, when cleanup may end, what a run
reports as freed, and how a lost leadership is recognised inside task-group errors."""

from __future__ import annotations

from cargohold.coordinator.gcstate import LostLeadership
from cargohold.coordinator.etcd import EtcdUnavailable
from cargohold.gc.collector import (
    _Condemned, _lost_leadership, _released, _unsettled, in_window, new_run, scheduled_run_due,
    seconds_until_scheduled,
)

DAY = 86400.0
MINUTE = 60.0


class Blob:
    """What the read model keeps of a blob, as far as cleanup looks."""

    def __init__(self, nodes=(), record=None, repos=()):
        self.nodes, self.record, self.repos = set(nodes), record, set(repos)

    def empty(self) -> bool:
        return self.record is None and not self.nodes and not self.repos


def test_a_scheduled_run_is_due_after_the_interval_and_inside_the_window():
    start = 10 * DAY + 2 * 3600            # 02:00 UTC
    assert not scheduled_run_due(start, last_finished=0.0, interval=0.0, window=None)      # no schedule
    assert scheduled_run_due(start, last_finished=start - 3600, interval=3600, window=None)
    assert not scheduled_run_due(start, last_finished=start - 3599, interval=3600, window=None)
    night = (60, 240)                     # 01:00-04:00
    assert scheduled_run_due(start, start - DAY, 3600, night)
    assert not scheduled_run_due(start + 3 * 3600, start - DAY, 3600, night)               # 05:00
    assert seconds_until_scheduled(start, start - 600, 3600) == 3000
    assert seconds_until_scheduled(start, start - 9999, 3600) == 1.0
    assert seconds_until_scheduled(start, 0.0, 0.0) is None


def test_a_window_may_wrap_past_midnight():
    late = (22 * 60, 2 * 60)
    assert in_window(23 * 3600, late) and in_window(DAY + 1 * 3600, late)
    assert not in_window(12 * 3600, late)
    assert in_window(12 * 3600, None)


def test_a_new_run_takes_its_time_from_the_given_clock():
    run = new_run(dry_run=True, reason="scheduled", now=1_000_000.0)
    assert run["requested"] == 1_000_000.0 and run["id"].startswith("19700112T134640-")


def test_cleanup_ends_when_every_tombstone_left_waits_for_a_node_that_is_down():
    blobs = {"gone": Blob(), "on-live": Blob(nodes={"a"}), "on-down": Blob(nodes={"b"})}
    tombstones = {"gone": "r1", "on-live": "r1", "on-down": "r1", "missing": "r1"}
    assert _released(tombstones, blobs) == {"gone": "r1", "missing": "r1"}
    # A tombstone whose last copy was released a moment ago is cleared, not reported as left.
    assert _unsettled(list(tombstones), blobs, alive={"a"}) == ["gone", "on-live", "missing"]
    assert _unsettled(["on-down"], blobs, alive={"a"}) == []


def test_bytes_freed_counts_the_copies_released_and_keeps_a_resumed_runs_figure():
    copies = _Condemned(already_freed=500)
    copies.add("x", 100, frozenset({"a", "b"}))
    copies.add("y", 10, frozenset({"a", "b"}))
    copies.add("nowhere", 7, frozenset())
    blobs = {"x": Blob(nodes={"a", "b"}), "y": Blob(nodes={"b"})}
    assert copies.bytes_freed(blobs) == 500 + 10                 # y's copy on a is gone
    blobs = {"y": Blob(nodes={"b"})}                               # x released everywhere; b down
    assert copies.bytes_freed(blobs) == 500 + 10                   # the watch has not said so yet
    copies.changed({"x", "unrelated"}, set())
    assert copies.bytes_freed(blobs) == 500 + 200 + 10
    copies.changed({"y"}, set())
    assert copies.bytes_freed({}) == 500 + 200 + 20 and not copies.pending


def test_lost_leadership_is_found_inside_task_group_errors():
    assert _lost_leadership(LostLeadership())
    assert _lost_leadership(ExceptionGroup("tg", [ExceptionGroup("inner", [LostLeadership()])]))
    assert _lost_leadership(ExceptionGroup("tg", [LostLeadership(), EtcdUnavailable("then etcd went")]))
    assert not _lost_leadership(ExceptionGroup("tg", [ValueError("bug")]))
    assert not _lost_leadership(ValueError("bug"))
