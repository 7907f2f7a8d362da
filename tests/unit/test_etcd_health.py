"""The etcd adapter's health state (when requests fail fast) and the background hold refresher:
logic without I/O, driven by a fake clock and a fake touch."""

from __future__ import annotations

import anyio
import pytest

from cargohold.coordinator.etcd import EtcdHealth, EtcdUnavailable
from cargohold.coordinator.holds import HoldRefresher
from cargohold.coordinator.records import BlobRecord


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def health(clock: Clock) -> EtcdHealth:
    return EtcdHealth(outage_after=2.0, probe_interval=1.0, clock=clock)


def test_reachable_until_a_failure_and_again_after_an_answer():
    clock = Clock()
    h = health(clock)
    assert h.reachable and not h.down and h.unreachable_for() == 0
    clock.now += 5
    h.failed()
    assert not h.reachable
    clock.now += 1
    assert h.unreachable_for() == pytest.approx(6)   # counted from the last answer, not the failure
    h.answered()
    assert h.reachable and h.unreachable_for() == 0


def test_down_only_after_failures_lasted_outage_after():
    clock = Clock()
    h = health(clock)
    assert h.until_down() == float("inf")
    h.failed()
    clock.now += 1.9
    h.failed()                       # a later failure does not restart the streak
    assert not h.down                # a leader election's blip is retried, not failed fast
    assert h.until_down() == pytest.approx(0.1)
    clock.now += 0.1
    assert h.down and h.outages == 1 and h.until_down() == 0
    assert h.down and h.outages == 1  # one outage, however often asked
    h.answered()
    assert not h.down


def test_while_down_one_probe_a_second_goes_through():
    clock = Clock()
    h = health(clock)
    h.failed()
    clock.now += 3
    assert h.take_probe()
    assert not h.take_probe()
    clock.now += 0.5
    assert not h.take_probe()
    clock.now += 0.5
    assert h.take_probe()


@pytest.mark.anyio
async def test_refresher_shares_one_touch_per_digest_and_reports_its_outcome():
    calls: list[str] = []
    release = anyio.Event()

    async def touch(digest: str, record: BlobRecord) -> bool:
        calls.append(digest)
        await release.wait()
        return digest != "gone"

    refresher = HoldRefresher(touch, workers=2)
    record = BlobRecord(1, 0.0, 0.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(refresher.run)
        first = refresher.request("a", record)
        assert refresher.request("a", record) is first
        gone = refresher.request("gone", record)
        await anyio.sleep(0.01)
        release.set()
        await first.done.wait()
        await gone.done.wait()
        tg.cancel_scope.cancel()
    assert sorted(calls) == ["a", "gone"]
    assert first.outcome is True and gone.outcome is False and refresher.refreshed == 2


@pytest.mark.anyio
async def test_refresher_counts_failures_and_drops_past_its_backlog():
    async def touch(digest: str, record: BlobRecord) -> bool:
        raise EtcdUnavailable("etcd is away")

    refresher = HoldRefresher(touch, workers=1, backlog=1)
    record = BlobRecord(1, 0.0, 0.0)
    queued = refresher.request("a", record)
    assert refresher.request("b", record) is None and refresher.dropped == 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(refresher.run)
        await queued.done.wait()
        tg.cancel_scope.cancel()
    assert queued.outcome is None and refresher.failed == 1
    assert refresher.request("a", record) is not None   # the next pull asks again
