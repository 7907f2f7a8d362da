"""Background pacing: free while the node is idle, at the set rate while it serves clients.

Pacing reads time.monotonic() and sleeps for real (no injectable clock yet), so these tests let
real time pass; the bounds are set so that right and wrong differ by far more than any load.
"""

from __future__ import annotations

import time

import anyio
import pytest

from cargohold.runtime.pacing import BackgroundPace, Foreground
from tests.support.poll import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param


async def take_many(pace: BackgroundPace, workers: int, units: int) -> float:
    started = time.monotonic()

    async def worker() -> None:
        for _ in range(units // workers):
            await pace.take()

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
    return time.monotonic() - started


async def test_idle_node_is_not_paced():
    foreground = Foreground(linger=0.2)
    # The bound is the behaviour: paced, 400 units at 1/s would take minutes.
    assert await take_many(BackgroundPace(foreground, rate=1), workers=8, units=400) < 20


async def test_busy_node_paces_all_workers_together():
    foreground = Foreground(linger=0.2)
    foreground.started()                     # a request in flight
    elapsed = await take_many(BackgroundPace(foreground, rate=200), workers=16, units=160)
    assert elapsed > 0.5, elapsed            # 160 units at 200/s, less a 0.25 s burst
    foreground.finished()
    assert foreground.busy()                 # lingers a moment after the last request
    await eventually(lambda: not foreground.busy(), what="the linger to end")


async def test_rate_zero_means_no_pacing():
    foreground = Foreground()
    foreground.started()
    # The bound is the behaviour: a rate of 0 taken literally would never finish.
    assert await take_many(BackgroundPace(foreground, rate=0), workers=4, units=400) < 20


async def test_paced_takers_wake_together_on_ticks():
    """So that their etcd writes can share transactions rather than trickle out one by one."""
    foreground = Foreground()
    foreground.started()
    pace = BackgroundPace(foreground, rate=200)
    woke: list[float] = []

    async def worker() -> None:
        for _ in range(3):
            await pace.take()
            woke.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        for _ in range(64):
            tg.start_soon(worker)
    moments = sorted(woke)
    groups = 1 + sum(1 for a, b in zip(moments, moments[1:]) if b - a > 0.02)
    assert groups <= 6, groups             # 192 units: a burst, then about 4 ticks of 50
