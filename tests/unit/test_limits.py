"""The I/O-free parts of the slow-client protection: body pace, head guard, connection cap."""

from __future__ import annotations

import resource

from cargohold.node.http import BodyPace
from cargohold.node.limits import RESERVED_DESCRIPTORS, HeadGuard, connection_cap


def test_body_pace_without_a_minimum_rate_is_an_idle_timeout():
    pace = BodyPace(60.0)
    assert pace.wait(0.0, 0) == pace.wait(3600.0, 10) == 60.0


def test_body_pace_cuts_a_trickle_within_the_timeout():
    pace = BodyPace(60.0, 1024)
    assert pace.wait(0.0, 0) == 60.0
    assert pace.wait(50.0, 2) < 10.1             # 2 bytes in 50 s: 10 s left, whatever the silence allowed
    assert pace.wait(61.0, 2) == 0.0              # a byte every 25 s: cut after about a minute


def test_body_pace_never_hurries_a_fast_body():
    pace = BodyPace(60.0, 1024)
    assert pace.wait(100.0, 100 * 1024 * 1024) == 60.0   # 1 MiB/s: only the idle timeout applies


def test_head_guard_counts_only_while_a_head_is_read():
    guard = HeadGuard(100)
    assert guard.reading and not guard.started
    guard.data(60)
    guard.data(60)
    assert guard.too_large and guard.started
    guard.head_complete()
    guard.data(10_000)                            # body bytes: not the head's
    assert not guard.too_large
    guard.head_begins()                           # the next request on the connection
    guard.data(100)
    assert not guard.too_large


def test_connection_cap_fits_under_the_descriptor_limit():
    assert connection_cap(1000, 20000) == 1000
    assert connection_cap(1000, 1024) == 1024 - RESERVED_DESCRIPTORS
    assert connection_cap(1000, 100) == 16
    assert connection_cap(1000, resource.RLIM_INFINITY) == 1000
